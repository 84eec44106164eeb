"""Test-session environment (offline, telemetry off) and the fixtures every test module shares:
``make_tiny_unet`` (the one tiny seeded UNet factory; also the ``tiny_unet`` fixture) and
``one_thread`` (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
import os

# Must be set before huggingface_hub / mlflow / prefect are imported anywhere.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402

TEXT_LEN, TEXT_DIM = 3, 8  # prompt length and width of the tiny text-conditional UNet


def make_tiny_unet(kind: str = "uncond", seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded FP UNet: ``uncond`` / ``class`` (num_class_embeds=3) UNet2DModel, ``text`` UNet2DConditionModel."""
    torch.manual_seed(seed)
    if kind in ("uncond", "class"):
        kw = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=4, attention_head_dim=4)
        if kind == "class":
            kw["num_class_embeds"] = 3
        kw.update(overrides)
        return UNet2DModel(**kw).eval()
    if kind == "text":
        kw = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                  norm_num_groups=4, attention_head_dim=2)
        kw.update(overrides)
        return UNet2DConditionModel(**kw).eval()
    raise ValueError(kind)


@pytest.fixture
def tiny_unet():
    """The factory ``make_tiny_unet(kind="uncond" | "class" | "text", seed=0, **overrides)``."""
    return make_tiny_unet


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and 2 threads next to another torch job collapse (~100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
