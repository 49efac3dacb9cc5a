"""The attacks, one file each (see ../README.md); ``engine.attacks`` imports them all."""
