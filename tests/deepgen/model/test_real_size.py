"""The full-size architecture, built on the meta device (no memory), matches the original's sizes."""

from deepgen.config import ModelConfig
from deepgen.model.backbone import DeepGenBackbone
from deepgen.model.published_configs import write_config_only_dirs


def test_real_size_parameter_counts(tmp_path):
    vlm_dir, dit_dir = write_config_only_dirs(tmp_path)
    cfg = ModelConfig(name="deepgen_5b", vlm_path=str(vlm_dir), dit_path=str(dit_dir))
    backbone = DeepGenBackbone.from_pretrained_dirs(cfg, device="meta")
    counts = backbone.parameter_counts()
    assert abs(counts["dit"] - 2.243e9) < 0.005e9
    assert abs(counts["vlm"] - 3.755e9) < 0.005e9
    assert abs(counts["vlm_vision"] - 0.669e9) < 0.005e9
    assert abs(counts["bridge"] - 432e6) < 1e6
    assert abs(counts["vae"] - 83.8e6) < 0.5e6
    assert backbone.fusion_layers == [35, 29, 23, 17, 11, 5]
    assert backbone.think_tokens.shape == (128, 2048)
    assert backbone.bridge.seq_head.out_features == 4096 and backbone.bridge.pooled_head.out_features == 2048
