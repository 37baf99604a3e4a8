"""Deep-learning dipole inversion (optional; needs PyTorch: ``pip install 'qsmflow[dl]'``).

Modules: :mod:`._torch` (lazy import), :mod:`.dipole` (dipole forward model and batched CG in
torch), :mod:`.models` (DIP generator, MoDL-QSM, SpiNet-QSM), :mod:`.inference` (whole-volume
inference at any matrix and voxel size), :mod:`.train` (``qsmflow-train``). Importing this
package does not import torch; the functions do, with a clear message when it is missing.
"""
