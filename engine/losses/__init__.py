"""Losses: NT-Xent across ranks (ntxent), symmetric cross-entropy (sce), MixMatch (mixmatch).

Import the submodules directly (``from engine.losses.ntxent import nt_xent``); this
package imports nothing so that each loss module stays independent of the others.
"""
