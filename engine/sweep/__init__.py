"""Experiment grids: ``dbd sweep`` (grid files, the cell runner, the Slurm array writer).

``grid`` loads and checks a grid file and expands its cells, ``runner`` runs them one
after another on the current launcher's ranks, ``slurm`` writes an sbatch array for
grids that outgrow one machine. The leaderboard is in engine.report.leaderboard.
"""
