"""Experiments in bulk: ``fx sweep`` runs a sweep file's points (fx.sweep.plan, fx.sweep.run), and ``fx report``
puts runs or a sweep's points on one static HTML page (fx.sweep.report). docs/sweeps.md."""
