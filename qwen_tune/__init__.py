"""qwen-tune: fine-tune Qwen chat models. Importing it first attaches the filters of library noise (quiet.py), so they
are in place before any library that prints it is imported, whichever module a program starts from."""

from . import quiet

quiet.install()
