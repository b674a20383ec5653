"""Pruning: a smaller (structured) or sparser (unstructured) copy of a model, written as a
Hugging Face folder that Deploy loads. methods.py has the table; compress.py runs one."""
