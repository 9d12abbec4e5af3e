"""The burrow protocol, sans I/O: frames and the session state machine.

Nothing in this package may import ``asyncio``, ``socket`` or ``ssl``
(``tests/protocol/test_sans_io.py`` enforces it).
"""
