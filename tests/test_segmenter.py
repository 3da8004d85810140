"""Segmenter parity: pixel decoder, transformer decoder and mask head against transformers' torch
MaskFormer (tiny random Swin config), the open-vocabulary head against reference 1.5 in numpy,
OVSeg .pth export/load round trips and checkpoint errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
import jax.numpy as jnp

from ovseg_jax.convert.params import torch_to_nnx
from ovseg_jax.convert.segmenter_keys import hf_maskformer_to_ours
from ovseg_jax.convert.torch_io import tensor_to_numpy
from ovseg_jax.models.pixel_decoder import BasePixelDecoder
from ovseg_jax.models.transformer_decoder import TransformerDecoder, sine_position_embedding

TOL = 1e-4
SWIN = dict(patch_size=4, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=3)
DECODER = dict(d_model=32, decoder_layers=3, decoder_ffn_dim=64, decoder_attention_heads=4, num_queries=7)
FPN, MASK = 64, 48
CHANNELS = {"res2": 16, "res3": 32, "res4": 64, "res5": 128}


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def torch_maskformer():
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, out_features=["stage1", "stage2", "stage3", "stage4"], **SWIN)
    config = MaskFormerConfig(backbone_config=swin, fpn_feature_size=FPN, mask_feature_size=MASK, num_labels=5,
                              decoder_config=dict(model_type="detr", encoder_layers=0, **DECODER))
    model = MaskFormerForInstanceSegmentation(config).eval()
    with torch.no_grad():  # random GroupNorm/LayerNorm affines so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".1.weight", ".1.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_outputs(torch_maskformer):
    """Outputs at an odd size (70 x 90: stride-32 map 3 x 3, FPN upsampling 3->5->9->18)."""
    x = torch.randn(2, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = torch_maskformer(x, output_hidden_states=True)
        norm = torch_maskformer.model.transformer_module.decoder.layernorm
        # transformers returns the zero input, the un-normalised outputs of the layers but the last,
        # and the last layer's output after the shared final norm; MaskFormer's deep supervision
        # uses every layer's output after that norm.
        states = out.transformer_decoder_hidden_states
        hs = torch.stack([norm(h) for h in states[1:-1]] + [states[-1]])
        assert torch.equal(states[-1], out.transformer_decoder_last_hidden_state)
    return {"features": {k: nhwc(t) for k, t in zip(CHANNELS, out.encoder_hidden_states)},
            "mask_features": nhwc(out.pixel_decoder_last_hidden_state), "hs": hs.numpy(),
            "masks": out.masks_queries_logits.numpy()}


@pytest.fixture(scope="module")
def hf_head_state(torch_maskformer):
    state = {k: tensor_to_numpy(v) for k, v in torch_maskformer.state_dict().items()}
    head, _ = hf_maskformer_to_ours(state, num_features=4, source="test")
    return head


def _load(module, state, prefix):
    torch_to_nnx({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, module, source=prefix)


def test_sine_position_embedding_matches_transformers():
    from transformers.models.maskformer.modeling_maskformer import MaskFormerSinePositionEmbedding

    ref = MaskFormerSinePositionEmbedding(num_position_features=16, normalize=True)((1, 32, 5, 7), "cpu", torch.float32)
    ours = sine_position_embedding(5, 7, 32)
    np.testing.assert_allclose(ours, nhwc(ref).reshape(35, 32), atol=1e-6)


def test_pixel_decoder_matches_transformers(torch_outputs, hf_head_state):
    decoder = BasePixelDecoder(CHANNELS, FPN, MASK, rngs=nnx.Rngs(0))
    _load(decoder, hf_head_state, "pixel_decoder.")
    features = {k: jnp.asarray(v) for k, v in torch_outputs["features"].items()}
    np.testing.assert_allclose(decoder(features), torch_outputs["mask_features"], atol=TOL)


def test_transformer_decoder_matches_transformers_per_layer(torch_outputs, hf_head_state):
    decoder = TransformerDecoder(CHANNELS["res5"], dim=DECODER["d_model"], num_queries=DECODER["num_queries"],
                                 heads=DECODER["decoder_attention_heads"], ffn_dim=DECODER["decoder_ffn_dim"],
                                 num_layers=DECODER["decoder_layers"], rngs=nnx.Rngs(0))
    _load(decoder, hf_head_state, "transformer_decoder.")
    hs = decoder(jnp.asarray(torch_outputs["features"]["res5"]))
    assert hs.shape == torch_outputs["hs"].shape == (3, 2, 7, 32)
    np.testing.assert_allclose(hs, torch_outputs["hs"], atol=TOL)
