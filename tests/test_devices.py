"""Machines differ: --dtype auto decides by measuring where the CPU decides the answer, and a broken Gaudi bridge
is one clear line, never a silent fall back to the CPU."""
import json

import pytest
import torch

import common
import speculative as S
from conftest import tiny_model

# seconds of (one draft step, a 1-token target forward, a 4-token target forward) as an Intel CPU with AMX gives
# them: bf16 slower than fp32 at one row, as cheap at four rows as at one
INTEL_LIKE = {torch.float32: (1.0, 3.0, 6.0), torch.bfloat16: (0.5, 3.3, 3.4)}
AMD_LIKE = {torch.float32: (1.0, 3.0, 6.0), torch.bfloat16: (0.5, 1.3, 1.5)}


def fake_costs(monkeypatch, table, calls):
    def step_costs(target, draft, prompt_ids, gamma, repeats=7):
        dtype = next(target.parameters()).dtype
        assert next(draft.parameters()).dtype == dtype   # one dtype per pair
        calls.append(dtype)
        return dict(zip(("t_draft", "t_target_1", "t_target_gamma1"), table[dtype]))
    monkeypatch.setattr(S, "step_costs", step_costs)


@pytest.mark.parametrize("table,plain", [(INTEL_LIKE, torch.float32), (AMD_LIKE, torch.bfloat16)])
def test_auto_dtype_gives_each_job_the_faster_dtype_and_caches_it(tmp_path, monkeypatch, table, plain):
    monkeypatch.setenv("FASTDRAFT_CACHE", str(tmp_path))
    target, draft = tiny_model(0), tiny_model(1, n_layers=1)
    calls, said = [], []
    fake_costs(monkeypatch, table, calls)
    picks = S.fastest_dtypes(target, draft, 3, say=said.append)
    # plain decoding pays a 1-token forward a token; a round pays 3 draft steps and a 4-token forward
    assert picks == {"autoregressive": plain, "speculative": torch.bfloat16}
    assert set(calls) == {torch.float32, torch.bfloat16} and "measured now" in said[0]
    assert next(target.parameters()).dtype == torch.float32   # measured on copies
    n = len(calls)
    assert S.fastest_dtypes(target, draft, 3, say=said.append) == picks and len(calls) == n   # from the cache
    assert "cached in" in said[-1] and "measured now" not in said[-1]
    S.fastest_dtypes(target, draft, 5, say=said.append)   # another lookahead: another question, measured
    assert len(calls) > n and len(json.loads((tmp_path / "decode_dtypes.json").read_text())) == 2


def test_auto_dtype_is_measured_only_where_the_cpu_decides(monkeypatch):
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    assert common.measure_decode_dtype(torch.device("cpu"), "auto")
    assert not common.measure_decode_dtype(torch.device("cpu"), "float32")
    assert not common.measure_decode_dtype(torch.device("cuda"), "auto")   # bf16 on accelerators by rule
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    assert not common.measure_decode_dtype(torch.device("cpu"), "auto")    # emulated bf16: float32


def test_a_gaudi_bridge_that_fails_to_import_is_one_clear_line(monkeypatch):
    """A torch from PyPI over Habana's breaks the bridge: say that, with its error, rather than 'no device' or a
    silent run on the CPU."""
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: object())

    def broken():
        raise ImportError("undefined symbol: _ZN3c10")
    monkeypatch.setattr(common, "_import_habana", broken)
    for name in ("auto", "hpu"):
        with pytest.raises(common.UserError, match="failed to import .*undefined symbol"):
            common.pick_device(name)
