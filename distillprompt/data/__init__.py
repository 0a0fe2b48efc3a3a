"""Tasks: a dataset loaded through Hugging Face ``datasets`` (or read directly, for local
JSON), its columns, labels and seeded samples."""

from .files import load_splits
from .labels import count_text
from .sampling import load_task
from .task import Example, Task

__all__ = ["load_splits", "count_text", "load_task", "Example", "Task"]
