"""Central DP on the SecAgg+ sum, in a real Flower simulation: the same seeded DP run on the plain path
and through Flower's SecAgg+ workflow releases the same noised global adapter, up to SecAgg+'s
quantization and the noise's scaling to the quantized sum's sensitivity; and the released adapter
differs from the exact (noise-free) clipped sum by Gaussian noise of the expected scale.

One Simulation Engine run (Ray) serves both modes. 6 devices, Poisson sampling at q = 4/6 (the
sample comes from the shared noise_seed, so both runs sample the same devices); 6 worker slots (the
Binomial(6, 4/6) quantile at secagg_slot_tail: every device may be sampled).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from wire.messages import FITRES_EXAMPLES, GLOBAL_UPDATE_KEY
from fedasls.config import Settings, poisson_slots
from fedasls.federated.strategies import make_global_strategy
from fedasls.privacy.noise import gaussian_like
from fedasls.privacy.secrets import DpSecrets
from server.rounds import FleetRun
from server.secagg import quantized_sensitivity, sum_quantization_bound
from tests.recording_grid import run_recorded
from tests.server.test_secagg import settings_for as plain_settings, write_users
from tests.settings_update import updated

pytestmark = pytest.mark.integration  # real SecAgg+ and plain DP runs on Flower (module fixture)

SLOTS, CLIP, Z, SEED, Q = 6, 0.05, 0.5, 7, 2**22


def settings_for(tiny_model_dir, data, mode: str) -> Settings:
    """test_secagg's run with Poisson sampling and central DP on the global adapter."""
    dp = updated(plain_settings(tiny_model_dir, data, mode), simulation={"sampling": "poisson", "overcommit": 1.3},
                 federated={"clip_norm": CLIP, "dp": True, "noise_multiplier": Z, "noise_seed": SEED,
                            "release_diagnostics": True})
    return Settings.model_validate(dp.model_dump())  # the load-time checks of a DP run


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-dp")
    write_users(root / "users.jsonl")
    runs = [(mode, FleetRun(settings_for(tiny_model_dir, root / "users.jsonl", mode), root / mode,
                            root / mode / "store", quiet=True, expected_slots=SLOTS)) for mode in ("none", "secagg+")]
    return dict(runs), run_recorded(runs, SLOTS)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_slots_cover_the_poisson_cohort_at_the_tail():
    assert poisson_slots(6, 4, 1e-12) == 6  # any of the 6 devices may be sampled
    assert poisson_slots(1_000_000, 1000, 1e-12) == 1230  # production: mean 1000 + ~7 sd


def test_dp_on_the_secagg_sum_equals_the_plain_dp_path_and_carries_noise_of_the_expected_scale(recorded,
                                                                                                tiny_model_dir):
    runs, received = recorded
    rounds = {m: read_jsonl(r.run_dir / "rounds.jsonl")[0] for m, r in runs.items()}
    secure = rounds["secagg+"]
    assert secure["secagg_ok"] == 1 and secure["secagg_dropouts"] == 0
    n = rounds["none"]["contributors"]
    assert secure["contributors"] == n >= 2  # the same Poisson sample, every update summed
    assert secure["user_epsilon"] == pytest.approx(rounds["none"]["user_epsilon"])
    assert "SecAgg+" in json.loads((runs["secagg+"].run_dir / "privacy.json").read_text())["report"]

    # the exact clipped sum, from the plain run's updates (they travel in the clear there)
    updates = [reply.content[GLOBAL_UPDATE_KEY] for mode, _, reply in received
               if mode == "none" and not reply.has_error() and GLOBAL_UPDATE_KEY in reply.content]
    assert len(updates) == n
    exact = {k: sum(torch.from_numpy(r[k].numpy()).double() for r in updates) for k in updates[0].keys()}

    settings = runs["none"].settings
    from fedasls.lm.adapter_layout import adapter_layout

    start = make_global_strategy(settings.federated, adapter_layout(settings), 4).adapter
    released = {m: load_file(str(r.run_dir / "global-adapter" / "round-00001.safetensors")) for m, r in runs.items()}
    expected_cohort = 4.0  # q N
    unit = gaussian_like(start, 1.0, DpSecrets.from_noise_seed(SEED).noise, 1)  # the seed's noise draw, std 1
    d = sum(v.numel() for v in start.values())
    plain_std, secure_std = Z * CLIP, Z * quantized_sensitivity(CLIP, d, Q)
    assert secure_std > plain_std  # the noise covers the quantized sum's sensitivity

    # 1. the plain path: exactly (sum + z C g) / E
    for k in start:
        want = start[k].double() + (exact[k] + plain_std * unit[k].double()) / expected_cohort
        assert torch.allclose(released["none"][k].double(), want, atol=1e-6)
    # 2. SecAgg+: the same sum (within its quantization error) and the same draw, at its sensitivity
    bound = sum_quantization_bound(n, CLIP, Q) / expected_cohort
    worst = 0.0
    for k in start:
        got = released["secagg+"][k].double() - released["none"][k].double()
        want = (secure_std - plain_std) * unit[k].double() / expected_cohort
        worst = max(worst, float((got - want).abs().max()))
    print(f"DP on SecAgg+ vs plain DP: max |difference| {worst:.3g}, quantization bound {bound:.3g}")
    assert worst <= bound + 5e-8, (worst, bound)  # + float32 rounding; unscaled noise would be off by ~1e-6
    # 3. against the noise-free sum, what SecAgg+ released is Gaussian noise of std z C_q (per coordinate)
    residual = torch.cat([((released["secagg+"][k].double() - start[k].double()) * expected_cohort - exact[k]).ravel()
                          for k in start])
    assert float(residual.std()) == pytest.approx(secure_std, rel=0.05)
    signal = math.sqrt(sum(float((v ** 2).sum()) for v in exact.values()))
    assert signal > 100 * bound * expected_cohort * math.sqrt(d)  # the sum is far above its quantization error


def test_under_dp_every_secagg_update_carries_the_unit_weight(recorded):
    runs, received = recorded
    weights = [int(reply.content[FITRES_EXAMPLES]["num_examples"]) for mode, _, reply in received
               if mode == "secagg+" and not reply.has_error() and FITRES_EXAMPLES in reply.content]
    assert weights and set(weights) <= {0, 50} and 50 in weights  # not the example counts
