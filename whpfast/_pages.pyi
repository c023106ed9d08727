# Type stub for the compiled module whpfast/_pages.pyx: page-granular scans and copies of guest
# memory for snapshots and restores. Memory arguments take any C-contiguous buffer (memoryview,
# numpy array, GuestMemory); bitmaps are numpy arrays of uint64 words, one bit per page.
from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

_Bitmap = npt.NDArray[np.uint64]

def capture(src: Buffer, dst: Optional[Buffer], nonzero: _Bitmap) -> int: ...
def restore(dst: Buffer, image: Buffer, dirty: _Bitmap, nonzero: _Bitmap) -> Tuple[int, int]: ...
def plan_reprotect(dirty: _Bitmap, hot: _Bitmap, previous: _Bitmap, reprotect: _Bitmap,
                   touched: npt.NDArray[np.uint32], n_touched: int, hot_limit: int,
                   n_hot: int) -> Tuple[int, int, int, int]: ...
def count_bits(bitmap: _Bitmap) -> int: ...
def host_cpuid(leaf: int, subleaf: int = 0) -> Tuple[int, int, int, int]: ...
