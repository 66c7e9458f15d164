"""A run: its folder (``directory``), what plugins see of it (``run``), the trackers watching it (``tracking``), its
loss plot (``plots``), and the experiment it came from when it resumes (``resume``)."""
