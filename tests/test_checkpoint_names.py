from languini.train_lib.checkpoint import clean_state_dict


def test_wrapper_names_are_dropped_wherever_they_sit():
    names = {
        "module._orig_mod.linear.weight": "linear.weight",  # compile(DDP(m))
        "_orig_mod.module.ln_f.bias": "ln_f.bias",  # DDP(compile(m))
        "layers.0._orig_mod.mlp.fc.weight": "layers.0.mlp.fc.weight",  # a compiled block
        "layers.0.module.weight": "layers.0.module.weight",  # an inner attribute called `module` stays
    }
    assert clean_state_dict(dict.fromkeys(names, 0)) == dict.fromkeys(names.values(), 0)
