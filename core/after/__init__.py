"""After training: a finished run loaded again (``inference``), merged into its base (``merge``), published
(``publish``), talked to (``chat``), and past runs listed and compared (``runs``)."""
