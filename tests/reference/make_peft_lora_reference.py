#!/usr/bin/env python3
"""Reference data for tests/test_functional.cpp: a LoRA layer run by PEFT.

For each case a tiny torch.nn.Linear model is wrapped by PEFT's LoraModel, its adapter weights are set to
random values (B non-zero, so the update matters), and PEFT computes the output and the gradients of x, A
and B for random x and dY. The float64 truth is computed from the same values with plain torch ops.
Everything goes into <out>/peft_lora_<case>.safetensors for the C++ test to compare against. The
autocast case runs PEFT's forward inside torch.autocast("cpu", dtype=torch.bfloat16) on an fp32 model.
"""
import argparse
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

CASES = [
    # name, dtype, rank, alpha, rslora, bias, in, out, leading dims, autocast dtype (CPU autocast around
    # PEFT's forward; the model stays in `dtype`)
    ("fp32", torch.float32, 8, 16.0, False, True, 48, 40, (3, 5), None),
    ("fp32_rslora", torch.float32, 4, 8.0, True, False, 32, 24, (7,), None),
    ("bf16", torch.bfloat16, 8, 16.0, False, True, 64, 56, (4, 9), None),
    ("autocast_bf16", torch.float32, 8, 16.0, False, True, 64, 56, (4, 9), torch.bfloat16),
]


class Tiny(torch.nn.Module):
    def __init__(self, d_in, d_out, bias):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.proj(x)


def make_case(name, dtype, rank, alpha, rslora, bias, d_in, d_out, lead, autocast, out_dir, seed):
    g = torch.Generator().manual_seed(seed)
    model = Tiny(d_in, d_out, bias)
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in**0.5)
        if bias:
            model.proj.bias.copy_(torch.randn(d_out, generator=g) * 0.1)
    model = model.to(dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.proj
    a = torch.randn(rank, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, rank, generator=g) / rank**0.5
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(*lead, d_in, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(*lead, d_out, generator=g).to(autocast or dtype)
    if autocast:
        with torch.autocast("cpu", dtype=autocast):
            y = peft_model(x)
        assert y.dtype == autocast, y.dtype
    else:
        y = peft_model(x)
    y.backward(dy)

    # float64 truth from the same (already rounded) values.
    scale = alpha / rank**0.5 if rslora else alpha / rank
    w64 = layer.base_layer.weight.detach().double()
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b64 = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T + scale * (x64 @ a64.T) @ b64.T
    if bias:
        y64 = y64 + layer.base_layer.bias.detach().double()
    y64.backward(dy.double())

    tensors = {
        "weight": layer.base_layer.weight.detach().contiguous(),
        "lora_A": layer.lora_A["default"].weight.detach().contiguous(),
        "lora_B": layer.lora_B["default"].weight.detach().contiguous(),
        "x": x.detach().contiguous(),
        "dy": dy.contiguous(),
        "peft_y": y.detach().contiguous(),
        "peft_dx": x.grad.contiguous(),
        "peft_dA": layer.lora_A["default"].weight.grad.contiguous(),
        "peft_dB": layer.lora_B["default"].weight.grad.contiguous(),
        "truth_y": y64.detach(),
        "truth_dx": x64.grad,
        "truth_dA": a64.grad,
        "truth_dB": b64.grad,
    }
    if bias:
        tensors["bias"] = layer.base_layer.bias.detach().contiguous()
    metadata = {"rank": str(rank), "alpha": repr(alpha), "use_rslora": json.dumps(rslora),
                "dtype": str(dtype), "peft_scaling": repr(layer.scaling["default"]),
                "autocast": str(autocast) if autocast else ""}
    assert abs(layer.scaling["default"] - scale) < 1e-12, (layer.scaling["default"], scale)
    save_file(tensors, os.path.join(out_dir, f"peft_lora_{name}.safetensors"), metadata=metadata)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    for i, case in enumerate(CASES):
        make_case(*case, out_dir=args.out, seed=1234 + i)
    print(f"wrote {len(CASES)} PEFT LoRA reference cases to {args.out}")


if __name__ == "__main__":
    main()
