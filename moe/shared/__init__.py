"""The ground floor: atomic writes, file locks and the user-error types, used by every room above.

Imports nothing else of ``moe``.
"""
