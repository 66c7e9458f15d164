"""``fx bench``: the experiment's training loop timed and measured (``measure``) against the plain recipe
(``reference``), and results written, read and compared with a baseline (``compare``)."""
