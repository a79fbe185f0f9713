"""An empty program: the runner measures process wall time and peak RSS."""
