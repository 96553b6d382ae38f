"""Fixtures shared by the lower_to_triton test modules (built once per module: the interpreter
is slow). The cases themselves live in tests/support/triton_cases.py."""
import pytest


@pytest.fixture(scope="module")
def on_cpu():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXOPT_TRITON_ON_CPU", "1")
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(scope="module")
def float_res(on_cpu):
    """(x, the float graph before lower_to_triton, the graph after, the pass's result)."""
    import triton_cases  # needs triton: imported only by the modules that skip without it
    return triton_cases.float_res_case()


@pytest.fixture(scope="module")
def float_se(on_cpu):
    """(x, the float SE graph before lower_to_triton, the graph after, the pass's result)."""
    import triton_cases
    return triton_cases.float_se_case()


@pytest.fixture(scope="module")
def resnet_int8(on_cpu):
    """The int8 MiniResNet lowered: (x, the graph before, the graph after, the result)."""
    import triton_cases
    return triton_cases.mini_int8()
