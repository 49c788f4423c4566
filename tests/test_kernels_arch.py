"""kernels.py's path for architecture-specific targets (sm_90a), on a machine without CuPy: NVRTC (faked) gets
exactly one -arch, ours; its log becomes a KernelCompileError; the cubin loads and the kernel is called like a
RawKernel."""

from __future__ import annotations

import sys
import types

import pytest

from cupaged import kernels


class FakeNvrtc(types.ModuleType):
    class NVRTCError(Exception):
        pass

    def __init__(self, fail: bool) -> None:
        super().__init__("nvrtc")
        self.fail, self.options, self.names, self.destroyed = fail, None, [], False

    def createProgram(self, source, name, headers, include_names):  # noqa: N802 (NVRTC's names)
        assert "flash_prefill_sm90" in source
        return 7

    def addNameExpression(self, prog, name):  # noqa: N802
        self.names.append(name)

    def compileProgram(self, prog, options):  # noqa: N802
        self.options = list(options)
        if self.fail:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION")

    def getProgramLog(self, prog):  # noqa: N802
        return "flash_prefill_sm90.cu(40): error: identifier wgmma is undefined"

    def getLoweredName(self, prog, name):  # noqa: N802
        return "_Z_lowered_" + name

    def getCUBIN(self, prog):  # noqa: N802
        return b"cubin"

    def destroyProgram(self, prog):  # noqa: N802
        self.destroyed = True


class FakeFunction:
    ptr = 1234

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Installs fake cupy / cupy_backends modules; returns a factory of the fake NVRTC (fail or not)."""
    state = {}

    class Module:
        def load(self, cubin):
            state["loaded"] = cubin

        def get_function(self, name):
            state["function_name"] = name
            state["function"] = FakeFunction()
            return state["function"]

    driver = types.SimpleNamespace(funcSetAttribute=lambda f, attr, value: state.update(smem=(f, attr, value)))
    cuda = types.ModuleType("cupy.cuda")
    cuda.function = types.SimpleNamespace(Module=Module)
    cuda.driver = driver
    cuda.compiler = types.SimpleNamespace(CompileException=type("CompileException", (Exception,), {}))
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    cupy.RawModule = lambda **kwargs: pytest.fail("an sm_90a kernel must not go through cupy.RawModule")
    libs = types.ModuleType("cupy_backends.cuda.libs")
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy_backends", types.ModuleType("cupy_backends")),
                         ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                         ("cupy_backends.cuda.libs", libs)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(kernels, "include_options", lambda: ("-I/cuda/include",))

    def install(fail: bool) -> tuple[FakeNvrtc, dict]:
        libs.nvrtc = FakeNvrtc(fail)
        return libs.nvrtc, state

    return install


NAME = "flash_prefill_sm90<__nv_bfloat16, 128, false>"


def test_arch_specific_compile_has_one_arch_and_loads_the_cubin(fake_cuda) -> None:
    nvrtc, state = fake_cuda(fail=False)
    fn = kernels._module.__wrapped__("flash_prefill_sm90.cu", (NAME,), (), "90a").get_function(NAME)
    assert [o for o in nvrtc.options if o.startswith("-arch")] == ["-arch=sm_90a"]
    assert "--device-as-default-execution-space" in nvrtc.options and "-I/cuda/include" in nvrtc.options
    assert nvrtc.names == [NAME] and nvrtc.destroyed
    assert state["loaded"] == b"cubin" and state["function_name"] == "_Z_lowered_" + NAME
    fn.max_dynamic_shared_size_bytes = 230400
    assert state["smem"] == (1234, 8, 230400)
    fn((3,), (256,), ("args",), shared_mem=230400)
    assert state["function"].calls == [((3,), (256,), ("args",), 230400)]


def test_arch_specific_compile_error_carries_the_log(fake_cuda) -> None:
    nvrtc, _ = fake_cuda(fail=True)
    with pytest.raises(kernels.KernelCompileError, match="identifier wgmma is undefined"):
        kernels._module.__wrapped__("flash_prefill_sm90.cu", (NAME,), (), "90a")
    assert nvrtc.destroyed
