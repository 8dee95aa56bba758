"""Generated Triton kernels for fused regions of a program.

  layout.py    how a value of a region lies in its (rows, cols) index space: FULL, ROW, COL, SCALAR
  rules.py     the table keyed by ATen op: which ops fuse and the Triton code each lowers to
  codegen.py   one readable Triton kernel per region, with its memory traffic stated
  cache.py     generated modules on disk, keyed by a hash of source and shapes; corrupt entries rebuilt
  launch.py    the `shardfx::triton_region` op the executor runs: looks the kernel up and launches it
  report.py    bytes moved per region (kernel, lower bound, unfused) and kernels per step

Importing this package registers the op; importing triton is deferred to the
first kernel load, so graphs and tools work where triton is not installed.
"""
