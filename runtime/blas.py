"""Make MLX's CPU matmul fast on Linux, without touching torch, and tell which BLAS each one really uses.

MLX's Linux CPU wheel bundles the *reference* BLAS (1-6 GFLOP/s sgemm on 1024^3 here, 30-50x slower than
OpenBLAS). The obvious fix, loading OpenBLAS with RTLD_GLOBAL (or LD_PRELOAD) before mlx.core, also
hijacks torch: libtorch_cpu exports its statically linked MKL `sgemm_`/`dgemm_` and calls them through
its PLT, so a global OpenBLAS wins those too (measured: torch's 1024^3 sgemm 3-4x slower). So instead:

- the optimized BLAS is loaded *locally* (RTLD_LOCAL: invisible to every other library), and
- `preload()` re-points MLX's own GOT slots for the BLAS functions it imports (cblas_sgemm, cblas_dgemm,
  cblas_cgemm) from the bundled library to it: at once if mlx.core is loaded, else right after
  mlx.core is imported (a one-shot import hook). Import order does not matter any more.

The BLAS is, in order: `$VLLM_METAL_BLAS`, a system OpenBLAS, the OpenBLAS of the `scipy-openblas32` wheel (a
dependency on Linux, so that a pip-only install is fast; its symbols carry a `scipy_` prefix, which the lookup
handles).
`import runtime` calls `preload()`, and the package's `vllm_metal_blas.pth` hook calls it in every interpreter
of the environment. `report()` reads the GOT slots the dynamic linker (or we) filled, so it tells the truth
either way. A system OpenBLAS is also told which kernels to use (`OPENBLAS_CORETYPE`, from the CPU flags)
unless the user set it, because Debian's OpenBLAS 0.3.21 mis-detects newer CPUs and falls back to generic
kernels; the wheel's newer OpenBLAS detects them itself.
The lowered step's matrix products up to a few hundred rows run in our own kernels (runtime/kernels/cpu_ext.py);
the BLAS serves the larger ones (prefill) and anything else MLX multiplies. LAPACK calls (linalg ops) stay on MLX's bundled LAPACK. Importing this module loads neither mlx nor torch.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

# The scipy-openblas32 wheel: 32-bit integers (the cblas ABI MLX calls), every symbol prefixed.
_WHEEL_PACKAGE, _WHEEL_LIBRARY = "scipy_openblas32", os.path.join("lib", "libscipy_openblas.so")
# System libraries: Debian/Ubuntu (libopenblas0-pthread), Fedora, generic; first existing wins.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
ENV_VAR = "VLLM_METAL_BLAS"  # path of a BLAS to use, or "none" to keep MLX's bundled one

_loaded: str | None = None  # path of the optimized BLAS chosen by preload()
_handle: ctypes.CDLL | None = None  # ... once loaded (when mlx.core is)
_prefix = ""  # its symbol prefix ("scipy_" for the wheel's OpenBLAS)
_patched: list[str] = []  # MLX imports re-pointed to it


# ---------------------------------------------------------------- ELF / dynamic linker helpers


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


class _DlPhdrInfo(ctypes.Structure):  # the leading fields of glibc's struct dl_phdr_info
    _fields_ = [("dlpi_addr", ctypes.c_size_t), ("dlpi_name", ctypes.c_char_p)]


_libc = ctypes.CDLL(None, use_errno=True)  # the global scope: dladdr, dl_iterate_phdr, mprotect
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _library_of(address: int | None) -> str | None:
    """Real path of the shared object that contains `address` (dladdr)."""
    info = _DlInfo()
    if not address or _libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) == 0:
        return None
    return os.path.realpath(info.dli_fname.decode()) if info.dli_fname else None


def _loaded_objects() -> list[tuple[str, int]]:
    """(path, load bias) of every shared object in this process, via dl_iterate_phdr."""
    found: list[tuple[str, int]] = []
    callback_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_DlPhdrInfo), ctypes.c_size_t, ctypes.c_void_p)

    def visit(info, _size, _data):
        if info.contents.dlpi_name:
            found.append((info.contents.dlpi_name.decode(), info.contents.dlpi_addr))
        return 0

    _libc.dl_iterate_phdr(callback_t(visit), None)
    return found


# GLOB_DAT and JUMP_SLOT relocations: the slot holds the absolute address of the symbol.
_SLOT_RELOCS = {6, 7, 1025, 1026}  # x86_64: 6, 7; aarch64: 1025, 1026
_slot_cache: dict[str, dict[str, list[int]]] = {}


def _got_slots(path: str) -> dict[str, list[int]]:
    """{symbol: [GOT slot offsets from the load bias]} of a shared object's imports.

    Minimal ELF64 little-endian reader: walks the RELA sections linked to the dynamic symbol table.
    """
    if path in _slot_cache:
        return _slot_cache[path]
    slots: dict[str, list[int]] = {}
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return slots  # not ELF64 little-endian
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        raw = f.read(shentsize * shnum)
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
        sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]

        def read(sec):
            f.seek(sec[4])
            return f.read(sec[5])

        for sec in sections:
            if sec[1] != 4 or sections[sec[6]][1] != 11:  # SHT_RELA against SHT_DYNSYM only
                continue
            symtab = sections[sec[6]]
            syms, strs, relas = read(symtab), read(sections[symtab[6]]), read(sec)
            for off in range(0, len(relas), 24):
                r_offset, r_info = struct.unpack_from("<QQ", relas, off)
                if (r_info >> 32) == 0 or (r_info & 0xFFFFFFFF) not in _SLOT_RELOCS:
                    continue
                (st_name,) = struct.unpack_from("<I", syms, (r_info >> 32) * 24)
                name = strs[st_name : strs.index(b"\0", st_name)].decode()
                slots.setdefault(name, []).append(r_offset)
    _slot_cache[path] = slots
    return slots


def _objects(prefix: str, also: str | None = None) -> list[tuple[str, int]]:
    """Loaded objects whose file name starts with `prefix` (plus the one at path `also`)."""
    return [(p, b) for p, b in _loaded_objects() if os.path.basename(p).startswith(prefix) or os.path.realpath(p) == also]


def _bindings(objects: list[tuple[str, int]], symbol: str) -> list[tuple[int, str | None]]:
    """(slot address, library the slot points into) for each GOT slot of `symbol` in `objects`."""
    out = []
    for path, bias in objects:
        try:
            offsets = _got_slots(path).get(symbol, [])
        except (OSError, struct.error, ValueError, IndexError):
            continue
        for off in offsets:
            out.append((bias + off, _library_of(ctypes.c_void_p.from_address(bias + off).value)))
    return out


def _write_pointer(addr: int, value: int) -> None:
    """Store a pointer into a GOT slot, lifting RELRO write protection for the write if needed."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = addr & ~(page - 1)
    prot = _page_prot(start)
    if not prot & 2:  # PROT_WRITE
        if _libc.mprotect(start, page, prot | 2) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed on MLX's GOT")
    ctypes.c_void_p.from_address(addr).value = value
    if not prot & 2:
        _libc.mprotect(start, page, prot)


def _page_prot(page: int) -> int:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= page < hi:
                perms = line.split()[1]
                return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)
    raise OSError(f"address {page:#x} is not mapped")


# ---------------------------------------------------------------- the fix


def _mlx_objects() -> list[tuple[str, int]]:
    """libmlx*.so (the MLX build that calls BLAS) and, in case MLX is linked statically, mlx.core itself."""
    core = sys.modules.get("mlx.core")
    return _objects("libmlx", os.path.realpath(core.__file__) if getattr(core, "__file__", None) else None)


def _patch_mlx() -> None:
    """Re-point every MLX import that the bundled BLAS provides (where cblas_sgemm goes) to our BLAS."""
    if _handle is None:
        return
    mlx = _mlx_objects()
    # The library MLX's cblas_sgemm is bound to, if it is a reference BLAS (a future MLX may ship a fast one).
    bundled = {_base_of(_slot_value(a)) for a, lib in _bindings(mlx, "cblas_sgemm") if lib and is_reference_blas(lib)}
    bundled.discard(None)
    # Only slots into the bundled BLAS: not LAPACK (also in OpenBLAS), libc, or slots already ours.
    _patched.extend(_repoint(mlx, _handle, _prefix, bundled))


def _repoint(mlx: list[tuple[str, int]], handle: ctypes.CDLL, prefix: str, from_bases: set) -> list[str]:
    """Write `handle`'s address of each BLAS name into every GOT slot of the `mlx` objects that points into a
    library based at one of `from_bases`. Returns the names re-pointed (one per slot)."""
    done = []
    for path, bias in mlx:
        for symbol, offsets in _got_slots(path).items():
            if not (symbol.startswith("cblas_") or (symbol.endswith("_") and symbol[:-1].isalnum())):
                continue  # BLAS names only: C (cblas_*) and Fortran (sgemm_) interfaces
            try:
                target = ctypes.cast(handle[prefix + symbol], ctypes.c_void_p).value
            except AttributeError:
                continue  # that BLAS lacks it
            for addr in (bias + off for off in offsets):
                if _base_of(_slot_value(addr)) in from_bases:
                    _write_pointer(addr, target)
                    done.append(symbol)
    return done


def _load_and_patch() -> None:
    """Load the chosen BLAS (RTLD_LOCAL: torch must not see it) and point MLX at it.

    Never breaks `import mlx.core`: on failure MLX keeps its slow bundled BLAS, loudly (report() tells too).
    """
    global _handle, _prefix
    try:
        if _handle is None:
            _handle = _dlopen_local(_loaded)
            _prefix = symbol_prefix(_handle)
        _patch_mlx()
    except Exception as exc:  # noqa: BLE001
        import warnings

        warnings.warn(f"vllm-metal: could not point MLX at {_loaded}: {exc!r}; MLX keeps its slow bundled BLAS")


def use_library(path: str) -> None:
    """Point MLX (already imported) at another BLAS library from now on, in place of the one preload() chose:
    benchmarks compare two libraries in one process with it. Needs preload() to have patched MLX first."""
    global _handle, _prefix, _loaded
    if _handle is None:
        raise RuntimeError("use_library() switches the BLAS preload() installed, and none is installed")
    handle = _dlopen_local(path)
    prefix = symbol_prefix(handle)
    current = _base_of(ctypes.cast(_handle[_prefix + "cblas_sgemm"], ctypes.c_void_p).value)
    _repoint(_mlx_objects(), handle, prefix, {current})
    _handle, _prefix, _loaded = handle, prefix, path


def _slot_value(addr: int) -> int | None:
    return ctypes.c_void_p.from_address(addr).value


def _base_of(address: int | None) -> int | None:
    """Load address of the shared object containing `address` (cheaper than its path)."""
    info = _DlInfo()
    if not address or _libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) == 0:
        return None
    return info.dli_fbase


class _PatchAfterImport:
    """One-shot import hook (a meta path finder that is also the loader): lets mlx.core load normally,
    then patches MLX's GOT. Duck-typed rather than importlib.abc-derived: this module is imported at
    every interpreter start (the package's .pth hook), so it imports nothing heavy."""

    def find_spec(self, name, path, target=None):
        if name != "mlx.core" or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)  # loads libmlx.so and the bundled BLAS

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of the hook
        _load_and_patch()


def _cpu_coretype() -> str | None:
    """The OpenBLAS kernel family for this x86_64 CPU, from its feature flags.

    OpenBLAS 0.3.21 (Debian 12) does not recognise newer CPUs such as Sapphire Rapids and silently falls
    back to its generic "Prescott" SSE3 kernels: ~15 instead of ~190 GFLOP/s on a 1024^3 sgemm here.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags:
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def symbol_prefix(lib: ctypes.CDLL) -> str:
    """The prefix of a BLAS library's exported names: "" for a plain one, "scipy_" for scipy-openblas."""
    for prefix in ("", "scipy_"):
        if hasattr(lib, prefix + "cblas_sgemm"):
            return prefix
    raise OSError("it exports no cblas_sgemm (nor scipy_cblas_sgemm): not a BLAS library")


def _dlopen_local(path: str) -> ctypes.CDLL:
    """dlopen with RTLD_LOCAL (torch must not see it), telling a system OpenBLAS its kernels unless the user did."""
    forced = None
    name = os.path.basename(path).lower()
    if "OPENBLAS_CORETYPE" not in os.environ and "openblas" in name and "scipy_openblas" not in name:
        forced = _cpu_coretype()
    if forced:
        os.environ["OPENBLAS_CORETYPE"] = forced  # read once, by OpenBLAS's constructor, during dlopen
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
    finally:
        if forced:
            del os.environ["OPENBLAS_CORETYPE"]  # leave child processes to decide for themselves


def openblas_core() -> str | None:
    """The kernel family OpenBLAS runs ("SkylakeX", "Haswell", "Prescott" = generic), if it is OpenBLAS."""
    try:
        fn = getattr(_handle, _prefix + "openblas_get_corename")
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def wheel_openblas() -> str | None:
    """The library of the installed scipy-openblas32 wheel, found without importing it (its `__init__`
    loads the library globally, and this runs at every interpreter start)."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec(_WHEEL_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, _WHEEL_LIBRARY)
        if os.path.isfile(path):
            return path
    return None


def _find_openblas() -> str | None:
    # A system OpenBLAS first: on a 2-core x86 machine the wheel's build ran sgemm at 0.25-0.65x of Debian's
    # 0.3.21 with two threads (on par with one; docs/benchmarks.md). The wheel makes a pip-only install fast.
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    import ctypes.util  # imports subprocess, shutil, ...: only on this fallback path

    return ctypes.util.find_library("openblas") or wheel_openblas()


def preload() -> str | None:
    """Make MLX use an optimized BLAS (Linux only); returns its path, or None. Cheap to call again.

    Works before or after mlx.core is imported (the name predates that). Before, it only installs the
    import hook: interpreters that never import MLX (pip, tools) pay nothing.
    """
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() == "none":
        return None
    if choice and os.sep in choice and not os.path.isfile(choice):
        raise RuntimeError(f"{ENV_VAR}={choice!r}: no such file (give a BLAS library path, or 'none')")
    path = choice or _find_openblas()
    if not path:
        return None
    _loaded = path
    if "mlx.core" in sys.modules:
        _load_and_patch()
    else:
        sys.meta_path.insert(0, _PatchAfterImport())
    return path


# ---------------------------------------------------------------- the report


def sgemm_library() -> str:
    """Real path of the library MLX's `cblas_sgemm` calls go to ("accelerate" on macOS).

    Read from MLX's own GOT slot (Python loads extension modules with RTLD_NOW, so it is bound at import).
    """
    if sys.platform == "darwin":
        return "accelerate"
    import mlx.core  # noqa: F401  (load MLX and its bundled BLAS, as a real run would)

    libs = [lib for _, lib in _bindings(_mlx_objects(), "cblas_sgemm") if lib]
    return libs[0] if libs else "unknown"


def torch_sgemm_library() -> str | None:
    """Where torch's `sgemm_` calls go (its own MKL unless something global interposed it), if torch is loaded."""
    if "torch" not in sys.modules or not sys.platform.startswith("linux"):
        return None
    libs = [lib for _, lib in _bindings(_objects("libtorch_cpu"), "sgemm_") if lib]
    return libs[0] if libs else "unknown"


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
        "loaded": _loaded if _handle is not None else None,
        "openblas_core": openblas_core(),
        "patched": sorted(set(_patched)),
        "torch_sgemm_library": torch_sgemm_library(),
    }
