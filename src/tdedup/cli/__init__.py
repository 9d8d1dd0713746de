"""The ``tdedup`` command line: :mod:`.app` registers one thin command per operation;
:mod:`.common` holds what every command shares (error boundary, consoles, progress)."""
