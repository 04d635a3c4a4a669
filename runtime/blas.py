"""Make MLX's CPU matmul fast on Linux, and tell which BLAS it really uses.

MLX's Linux CPU wheel bundles the *reference* BLAS (~6 GFLOP/s sgemm, ~30x slower than OpenBLAS).
A BLAS loaded with RTLD_GLOBAL before `mlx.core` is imported wins symbol resolution, so MLX's
`cblas_sgemm` binds to it. `preload()` does that; it must run before the first `import mlx.core`,
which is why every entry point of this project imports `runtime` (whose `__init__` calls it) first
and why the setup script also installs a `.pth` hook that runs it in every interpreter of the venv.

Importing this module loads neither mlx nor torch (`report()` imports mlx.core, as a real run would).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import sys

# Debian/Ubuntu (libopenblas0-pthread), Fedora, generic; first existing wins.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
ENV_VAR = "VLLM_METAL_BLAS"  # path of a BLAS to preload, or "none" to skip

_loaded: str | None = None
_late = False  # preload() ran after mlx.core was already imported


def _find_openblas() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    name = ctypes.util.find_library("openblas")
    return name


def preload() -> str | None:
    """Load an optimized BLAS globally (Linux only). Returns its path, or None. Cheap to call again."""
    global _loaded, _late
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        _late = True  # too late to change MLX's binding; report() will tell
    path = choice or _find_openblas()
    if not path:
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        if choice:
            raise RuntimeError(f"{ENV_VAR}={choice!r} could not be loaded: {exc}") from exc
        return None
    _loaded = path
    return path


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class _DlPhdrInfo(ctypes.Structure):  # the leading fields of glibc's struct dl_phdr_info
    _fields_ = [("dlpi_addr", ctypes.c_size_t), ("dlpi_name", ctypes.c_char_p)]


def _library_of(address: int) -> str | None:
    libdl = ctypes.CDLL(None)
    info = _DlInfo()
    if libdl.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) == 0 or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _loaded_objects() -> list[tuple[str, int]]:
    """(path, load bias) of every shared object in this process, via dl_iterate_phdr."""
    found: list[tuple[str, int]] = []
    callback_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_DlPhdrInfo), ctypes.c_size_t, ctypes.c_void_p)

    def visit(info, _size, _data):
        name = info.contents.dlpi_name
        if name:
            found.append((name.decode(), info.contents.dlpi_addr))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(callback_t(visit), None)
    return found


def _got_slots(path: str, symbol: bytes) -> list[int]:
    """Offsets (relative to the load bias) of the GOT slots that relocations of `symbol` fill in `path`.

    Minimal ELF64 little-endian reader: walks the RELA sections linked to the dynamic symbol table.
    """
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return []  # not ELF64 LE: give up, the caller falls back
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        raw = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]

        def read(sec):
            f.seek(sec[4])
            return f.read(sec[5])

        slots = []
        for sec in sections:
            if sec[1] != 4:  # SHT_RELA
                continue
            symtab = sections[sec[6]]
            if symtab[1] != 11:  # relocations against .dynsym only
                continue
            syms, strs, relas = read(symtab), read(sections[symtab[6]]), read(sec)
            for off in range(0, len(relas), 24):
                r_offset, r_info = struct.unpack_from("<QQ", relas, off)
                sym = r_info >> 32
                if sym == 0 or (r_info & 0xFFFFFFFF) not in _SLOT_RELOCS:
                    continue
                st_name, = struct.unpack_from("<I", syms, sym * 24)
                if strs[st_name : strs.index(b"\0", st_name)] == symbol:
                    slots.append(r_offset)
        return slots


# JUMP_SLOT and GLOB_DAT relocation types: the slot holds the absolute address of the symbol.
_SLOT_RELOCS = {6, 7, 1025, 1026}  # x86_64: GLOB_DAT, JUMP_SLOT; aarch64: GLOB_DAT, JUMP_SLOT


def sgemm_library() -> str:
    """Path of the shared library that MLX's `cblas_sgemm` calls really go to ("accelerate" on macOS).

    Reads the address the dynamic linker wrote into MLX's own GOT slot for `cblas_sgemm` (Python loads
    extension modules with RTLD_NOW, so it is bound at import) and asks dladdr which library holds it.
    That is the truth even when the BLAS was loaded too late. If no slot is found (an unexpected build),
    it predicts the binding instead: the global scope first, then MLX's own dependencies.
    """
    if sys.platform == "darwin":
        return "accelerate"
    import mlx.core  # noqa: F401  (load MLX and its bundled BLAS, as a real run would)

    core_file = os.path.realpath(sys.modules["mlx.core"].__file__)
    for path, bias in _loaded_objects():
        # libmlx.so calls cblas_sgemm; a build linking MLX statically would have it in mlx.core itself.
        if not os.path.basename(path).startswith("libmlx") and os.path.realpath(path) != core_file:
            continue
        try:
            slots = _got_slots(path, b"cblas_sgemm")
        except (OSError, struct.error, ValueError, IndexError):
            continue
        for slot in slots:
            target = ctypes.c_void_p.from_address(bias + slot).value
            lib = _library_of(target) if target else None
            if lib and os.path.realpath(path) != lib:  # bound (a lazy, unbound slot points into MLX itself)
                return lib

    glob = ctypes.CDLL(None)
    try:
        addr = ctypes.cast(glob.cblas_sgemm, ctypes.c_void_p).value
        lib = _library_of(addr)
        if lib:
            return lib
    except AttributeError:
        pass
    core = ctypes.CDLL(sys.modules["mlx.core"].__file__)
    addr = ctypes.cast(core.cblas_sgemm, ctypes.c_void_p).value
    return _library_of(addr) or "unknown"


def is_reference_blas(path: str) -> bool:
    """True for the slow reference (netlib) BLAS that MLX's Linux CPU wheel bundles."""
    name = os.path.basename(path).lower()
    return not any(fast in name for fast in ("openblas", "mkl", "blis", "accelerate", "atlas"))


def report() -> dict:
    """What `lower-model env` and the benchmarks print about the BLAS in use."""
    lib = sgemm_library()
    return {
        "sgemm_library": lib,
        "reference_blas": is_reference_blas(lib),
        "preloaded": _loaded,
        "preloaded_too_late": _late,
    }
