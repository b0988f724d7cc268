"""A third-party plugin whose import fails, as after a bad upgrade of its dependency."""

raise ImportError("cannot import name 'Frobnicator' from 'somelib'")
