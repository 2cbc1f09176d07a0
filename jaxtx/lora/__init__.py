"""LoRA / QLoRA for every jaxtx model: adapters beside the Dense kernels, merge, Hugging Face PEFT exchange.

    lcfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    params = add_lora(model, params, lcfg, jax.random.key(0))   # b = 0: same outputs as the base
    logits = model.apply({"params": params}, ids)               # unmerged: x W + scale * (x a) b
    trainable, frozen = split(params)                           # train `trainable` only
    merged = merge(model, params)                               # plain params again
    model, params = load_peft(model, base_params, "adapter_dir")
    save_peft(model, params, "out_dir", base_model_name_or_path="meta-llama/...")
    served = stack_adapters(model, base_params, [params_x, params_y])  # slot 0 base, 1 x, 2 y
    logits = model.apply({"params": served}, ids_BT, adapter_ids=slots_B)  # each row its own adapter
"""
from jaxtx.lora.core import (LoraConfig, Site, adapter_shardings, adapters, add_lora, combine, has_lora,
                             init_adapters, merge, merge_report, resolve, sites, split, stack_adapters, strip)
from jaxtx.lora.peft import load_peft, save_peft

__all__ = ["LoraConfig", "Site", "adapter_shardings", "adapters", "add_lora", "combine", "has_lora", "init_adapters",
           "merge", "merge_report", "resolve", "sites", "split", "stack_adapters", "strip", "load_peft", "save_peft"]
