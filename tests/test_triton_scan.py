"""The Triton scan kernels against the step-by-step reference: outputs and gradients (f, u, c0).

Triton reads TRITON_INTERPRET when a kernel is defined (at import), so the CPU checks run the kernels in
a subprocess with TRITON_INTERPRET=1; nothing leaks into this process or other test files. The parent
writes the inputs, the subprocess writes what scan_triton returned, and the asserts happen here against
a float64 reference. Skipped when Triton is not installed (`pip install -e '.[triton]'`).
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import preset_config

from languini.common_lib.errors import UserError
from languini.projects.lstm import triton_scan
from languini.projects.lstm.model import Model
from languini.projects.lstm.scans import scan_reference

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

# Tests that need compiled (not interpreted) kernels in this process.
without_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "0", reason="TRITON_INTERPRET is set in this process"
)

# (batch, time, channels, input dtype, strided). Under the interpreter the kernels use CHUNK_T=16 and
# BLOCK_N=32 (INTERPRETER_META), so these cover partial chunks, partial channel blocks, exact multiples
# and T < one chunk. Kept small: the interpreter runs tl.associative_scan one element at a time.
SCAN_CASES = {
    "partial_chunk_and_block": (2, 37, 40, torch.float32, False),
    "exact_multiples": (1, 32, 32, torch.float32, False),
    "shorter_than_a_chunk": (3, 5, 7, torch.float32, False),
    "strided_views": (2, 20, 33, torch.float32, True),
    "bf16_inputs": (1, 24, 40, torch.bfloat16, False),
}

WORKER = r"""
import sys
import torch
from languini.projects.lstm.model import Model
from languini.projects.lstm.triton_scan import scan_triton

cases, model_case = torch.load(sys.argv[1], weights_only=False)  # holds a Config
results = {}
for name, case in cases.items():
    f, u, c0 = (case[k].clone().requires_grad_() for k in ("f", "u", "c0"))
    if case["strided"]:  # f and u as column slices of one [B, T, 2N] tensor, as a fused projection gives
        fu = torch.cat([f.detach(), u.detach()], dim=-1).requires_grad_()
        c = scan_triton(*fu.chunk(2, dim=-1), c0)
        c.backward(case["grad_c"])
        grad_f, grad_u = fu.grad.chunk(2, dim=-1)
    else:
        c = scan_triton(f, u, c0)
        c.backward(case["grad_c"])
        grad_f, grad_u = f.grad, u.grad
    results[name] = dict(c=c.detach(), grad_f=grad_f, grad_u=grad_u, grad_c0=c0.grad)

model = Model(model_case["config"])
model.load_state_dict(model_case["weights"])
logits, state = model(model_case["x"], model_case["state"])
logits.pow(2).mean().backward()
results["model"] = dict(logits=logits.detach(), final_c=[c.detach() for c, _ in state],
                        grads={k: p.grad for k, p in model.named_parameters()})
torch.save(results, sys.argv[2])
"""

COMPILE_WORKER = r"""
import sys
import torch
from languini.projects.lstm.scans import scan_reference
from languini.projects.lstm.triton_scan import scan_triton

def loss(scan, x, c0):
    return scan(torch.sigmoid(x + 1.0), torch.tanh(x), c0).square().sum()

x, c0 = torch.randn(2, 20, 33, requires_grad=True), torch.randn(2, 33, requires_grad=True)
compiled = torch.compile(loss, fullgraph=True)  # fullgraph: the custom ops must not break the graph
for scan, value in ((scan_triton, compiled(scan_triton, x, c0)), (scan_reference, loss(scan_reference, x, c0))):
    torch.save([value.detach(), *torch.autograd.grad(value, (x, c0))], f"{sys.argv[1]}.{scan.__name__}")
"""


def _scan_case(batch, length, width, dtype, strided, seed):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        f=torch.rand(batch, length, width, generator=gen).to(dtype),  # forget gates in (0, 1)
        u=torch.randn(batch, length, width, generator=gen).to(dtype),
        c0=torch.randn(batch, width, generator=gen),  # non-zero initial state, fp32 like the model's
        grad_c=torch.randn(batch, length, width, generator=gen),
        strided=strided,
    )


def _model_case():
    """A tiny quasi-LSTM with scan=triton, random weights, a random input and a non-zero initial state."""
    config = dataclasses.replace(preset_config("lstm", "nano"), vocab_size=64, n_layers=2, h_dim=32, mlp_dim=64,
                                 head_dim=8, n_heads=4, scan="triton")  # fmt: skip
    torch.manual_seed(0)
    model = Model(config)
    x = torch.randint(0, config.vocab_size, (2, 21))
    state = [tuple(torch.randn_like(s) for s in layer) for layer in model.get_init_state(2, "cpu")]
    return dict(config=config, weights=model.state_dict(), x=x, state=state)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(scan cases, model case, results): one interpreter subprocess runs every case."""
    tmp = tmp_path_factory.mktemp("triton_scan")
    cases = {name: _scan_case(*spec, seed=i) for i, (name, spec) in enumerate(SCAN_CASES.items())}
    model_case = _model_case()
    torch.save((cases, model_case), tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp / "in.pt"), str(tmp / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, model_case, torch.load(tmp / "out.pt")


def _reference(case):
    """Outputs and gradients of the float64 step-by-step loop on the same (already rounded) inputs."""
    f, u, c0 = (case[k].double().requires_grad_() for k in ("f", "u", "c0"))
    c = scan_reference(f, u, c0)
    c.backward(case["grad_c"].double())
    return dict(c=c.detach(), grad_f=f.grad, grad_u=u.grad, grad_c0=c0.grad)


@pytest.mark.parametrize("name", list(SCAN_CASES))
def test_scan_matches_reference(interpreted, name):
    cases, _, results = interpreted
    case, got, want = cases[name], results[name], _reference(cases[name])
    in_dtype = case["f"].dtype
    assert got["c"].dtype == torch.float32  # promoted with the fp32 c0, accumulated in fp32
    assert got["grad_f"].dtype == got["grad_u"].dtype == in_dtype
    assert got["grad_c0"].dtype == torch.float32
    torch.testing.assert_close(got["c"].double(), want["c"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad_c0"].double(), want["grad_c0"], rtol=1e-5, atol=1e-5)
    # grad_f and grad_u are rounded to the input dtype on store; the accumulation itself is fp32
    tol = 1e-5 if in_dtype == torch.float32 else 1e-2
    for key in ("grad_f", "grad_u"):
        torch.testing.assert_close(got[key].double(), want[key], rtol=tol, atol=tol)


def test_model_with_triton_scan_matches_reference_scan(interpreted):
    _, model_case, results = interpreted
    got = results["model"]
    model = Model(dataclasses.replace(model_case["config"], scan="reference"))
    model.load_state_dict(model_case["weights"])
    logits, state = model(model_case["x"], model_case["state"])
    logits.pow(2).mean().backward()
    torch.testing.assert_close(got["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
    for got_c, (want_c, _) in zip(got["final_c"], state):
        torch.testing.assert_close(got_c, want_c.detach(), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_torch_compile_fullgraph_through_the_custom_ops(tmp_path):
    prefix = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-c", COMPILE_WORKER, prefix], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = torch.load(f"{prefix}.scan_triton"), torch.load(f"{prefix}.scan_reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@without_interpreter
def test_cpu_tensors_without_interpreter_are_a_user_error():
    f = torch.rand(1, 4, 8)
    with pytest.raises(UserError, match="CUDA"):
        triton_scan.scan_triton(f, f, torch.zeros(1, 8))


def test_missing_triton_is_a_user_error(monkeypatch):
    monkeypatch.setattr(triton_scan, "triton", None)
    f = torch.rand(1, 4, 8)
    with pytest.raises(UserError, match="pip install"):
        triton_scan.scan_triton(f, f, torch.zeros(1, 8))


@without_interpreter
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter does not lower kernels; this runs Triton's real compiler (to sm_90 machine code)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    for kernel in (triton_scan._scan_fwd_kernel, triton_scan._scan_bwd_kernel):
        meta = {"CHUNK_T": 32, "BLOCK_N": 64, "NUM_STAGES": 3}
        signature = {
            name: "constexpr" if name in meta else ("*fp32" if name.endswith("_ptr") else "i32")
            for name in kernel.arg_names
        }
        compiled = compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case = _scan_case(4, 517, 768, dtype, strided=False, seed=7)
    want = _reference(case)
    f, u, c0 = (case[k].cuda().requires_grad_() for k in ("f", "u", "c0"))
    c = triton_scan.scan_triton(f, u, c0)
    c.backward(case["grad_c"].cuda())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(c.double().cpu(), want["c"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c0.grad.double().cpu(), want["grad_c0"], rtol=1e-4, atol=1e-4)
    for got, key in ((f.grad, "grad_f"), (u.grad, "grad_u")):
        torch.testing.assert_close(got.double().cpu(), want[key], rtol=max(tol, 1e-4), atol=max(tol, 1e-4))


@pytest.mark.gpu
def test_cuda_model_with_triton_scan_matches_block_parallel_scan():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case = _model_case()
    outputs = {}
    for scan in ("triton", "torch"):
        model = Model(dataclasses.replace(case["config"], scan=scan)).cuda()
        model.load_state_dict(case["weights"])
        state = [tuple(s.cuda() for s in layer) for layer in case["state"]]
        logits, _ = model(case["x"].cuda(), state)
        logits.pow(2).mean().backward()
        outputs[scan] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    torch.testing.assert_close(outputs["triton"][0], outputs["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in outputs["torch"][1].items():
        torch.testing.assert_close(outputs["triton"][1][name], grad, rtol=1e-3, atol=1e-6, msg=name)
