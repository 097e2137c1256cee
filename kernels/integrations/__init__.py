"""Patchers that put rtdetr_kernels into other codebases (imported lazily, per codebase)."""
