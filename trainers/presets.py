"""Hyperparameter presets: data, not code paths.

`resolve(model, dataset, overrides)` merges, in order: `DEFAULTS`, the model's `"*"` preset, the
model's preset for the dataset family (`"cifar"` for cifar10/cifar100/svhn, `"digits"`), the
family's preset for the training mode (`"cifar:joint"`; GMMC's `--mode`), and the user's
overrides. The CIFAR presets reproduce the papers' scripts (ALGORITHMS.md sections 1.5, 2,
3.4, 4.5, 5.3); the digits presets are small settings that train in minutes on 2 CPU cores.
"""

# Every setting a user can change, with its type and help. `None` defaults mean "not used" or
# "derived" (e.g. steps_per_epoch from the dataset size).
SETTINGS = {
    # Run.
    "model_dir": (str, "runs/jem", "where checkpoints, logs, samples and the model go"),
    "epochs": (int, 20, "number of epochs"),
    "steps_per_epoch": (int, None, "steps per epoch (default: examples / px_batch_size)"),
    "seed": (int, 1, "random seed"),
    "jit_compile": (str, "auto", (
        "XLA: auto (on with a GPU or TPU; off on CPUs, where it is slower), true or false")),
    "save_freq": (str, "epoch", "backup frequency: 'epoch' or a number of steps"),
    "mixed_precision": (str, "none", (
        "compute dtype policy: none (float32), mixed_bfloat16 (CPUs with AVX512-BF16, TPUs) or "
        "mixed_float16 (GPUs); variables, energies, sampler chains and the buffer stay float32")),
    "strategy": (str, "default", "tf.distribute strategy: default, mirrored, multi_worker, tpu"),
    "num_devices": (int, None, "mirrored replicas: the first N GPUs (no GPU: N logical CPUs)"),
    "tpu": (str, None, "TPU name or address for --strategy tpu (default: TPU_NAME or local)"),
    "sample_every": (int, 1, "write a PNG grid of samples every N epochs (0: never)"),
    "max_rollbacks": (int, 3, "rollbacks to the last checkpoint on divergence before giving up"),
    "verbose": (str, "auto", "progress: auto (bar on a TTY, one line per epoch otherwise), 0-2"),
    # Data.
    "data_dir": (str, None, "TFDS data directory (default ~/tensorflow_datasets)"),
    "manual_dir": (str, None, "directory with the dataset archives, prepared offline by TFDS"),
    "download": (bool, False, "let TFDS download the dataset (needs internet)"),
    "num_validation": (int, 0, "training images held out for validation"),
    "batch_size": (int, 64, "batch size of the cross-entropy stream"),
    "px_batch_size": (int, None, "batch size of the likelihood stream (default: batch_size)"),
    "augment": (str, None, "crop_flip, crop or none (default: the dataset's)"),
    "augment_px": (bool, True, "augment the likelihood stream too (SADA-JEM: no)"),
    "noise_scale": (float, 0.0, "Gaussian noise added to training images"),
    "test_noise_scale": (float, 0.0, "Gaussian noise added to test images (JEM: 0.03)"),
    # Backbone.
    "backbone": (str, "small_cnn", "small_cnn or wrn"),
    "depth": (int, 28, "Wide-ResNet depth"),
    "width": (int, 10, "Wide-ResNet width"),
    "norm": (str, "none", "none, batch, group, instance or layer"),
    "dropout_rate": (float, 0.0, "dropout inside the backbone"),
    # Optimizer.
    "optimizer": (str, "adam", "adam or sgd"),
    "learning_rate": (float, 1e-4, "learning rate after warm-up"),
    "momentum": (float, 0.9, "SGD momentum"),
    "beta_1": (float, 0.9, "Adam beta_1"),
    "beta_2": (float, 0.999, "Adam beta_2"),
    "weight_decay": (float, 0.0, "coupled L2 weight decay (PyTorch style)"),
    "warmup_steps": (int, 0, "linear learning-rate warm-up steps"),
    "decay_epochs": (str, "", "comma-separated epochs where the rate is multiplied by decay_factor"),
    "decay_factor": (float, 0.3, "learning-rate multiplier at each decay epoch"),
    "clipnorm": (float, None, "clip each gradient to this norm"),
    # Model and sampler.
    "buffer_size": (int, 10000, "replay buffer size"),
    "buffer_init": (str, "uniform", "uniform or gaussian_mixture"),
    "buffer_covariance": (str, "full", "full or diagonal class covariances (gaussian_mixture)"),
    "reinit_probability": (float, 0.05, "probability of restarting a chain"),
    "conditional_sampling": (bool, False, "draw p(x) samples class-conditionally"),
    "px_weight": (float, 1.0, "weight of the log p(x) term"),
    "pyx_weight": (float, 1.0, "weight of the cross-entropy term"),
    "pxy_weight": (float, 0.0, "weight of the log p(x, y) term"),
    "energy_l2_weight": (float, 0.0, "L2 penalty on energies"),
    "divergence_threshold": (float, 1e8, "loss/energy magnitude treated as divergence"),
    "sampler": (str, "sgld", "sgld or proximal"),
    "num_steps": (int, 20, "sampler steps per training iteration"),
    "inner_steps": (int, 5, "proximal sampler inner steps"),
    "step_size": (float, 1.0, "sampler step size"),
    "sampler_noise": (float, 0.01, "sampler noise standard deviation"),
    "gradient_clip": (float, None, "per-element clip of the sampler gradient"),
    "clip_samples": (bool, False, "clamp samples to the data range [-1, 1]"),
    "sample_in_training_mode": (bool, False, "BatchNorm in training mode while sampling"),
    "sam_rho": (float, 0.0, "SAM radius (0: no SAM)"),
    "sam_adaptive": (bool, False, "adaptive SAM (ASAM)"),
    # GMMC (--model gmmc only).
    "mode": (str, "joint", "GMMC training mode: discriminative (dis), generative (gen) or joint"),
    "center_scale": (float, 10.0, "GMMC: norm of the Max-Mahalanobis class centres"),
    "beta": (float, 0.5, "GMMC: weight of the sample energies in the generative loss"),
    "start_generative": (int, 50, "GMMC joint: first epoch with the generative loss"),
    "latent_noise": (float, 0.001, "GMMC sampler: noise of the latent target mu_y + noise"),
    "inject": (bool, False, "GMMC sampler: draw a new latent target at every step"),
    # IGEBM (--model igebm only).
    "conditional": (bool, True, "IGEBM: class-conditional energy E(x, y)"),
    "sn_filters": (str, "64", "IGEBM SNResNet widths: a base width or one per stage, e.g. 128,256"),
    "sn_num_blocks": (int, 1, "IGEBM: residual blocks per stage"),
    "sn_pooling": (str, "sum", "IGEBM: feature pooling, sum or mean"),
}

# Settings that only one model reads: giving them to another model is an error.
MODEL_SETTINGS = {
    "gmmc": ("mode", "center_scale", "beta", "start_generative", "latent_noise", "inject"),
    "igebm": ("conditional", "sn_filters", "sn_num_blocks", "sn_pooling"),
}

GMMC_MODES = ("discriminative", "generative", "joint")
MODE_ALIASES = {"dis": "discriminative", "gen": "generative"}

DEFAULTS = {name: spec[1] for name, spec in SETTINGS.items()}

MODELS = ("softmax", "jem", "jempp", "sadajem", "gmmc", "igebm")

# Per model: "*" applies to every dataset, then the dataset family's preset, then (GMMC) the
# family's preset for the training mode, "<family>:<mode>".
PRESETS = {
    "softmax": {
        "*": {"px_weight": 0.0},
        "digits": {"epochs": 40, "learning_rate": 3e-3, "noise_scale": 0.03,
                   "warmup_steps": 100},
        "cifar": {"backbone": "wrn", "optimizer": "sgd", "learning_rate": 0.1,
                  "weight_decay": 5e-4, "epochs": 200, "decay_epochs": "60,120,160",
                  "decay_factor": 0.2, "norm": "batch"},
    },
    # JEM: ALGORITHMS.md 1.5.
    "jem": {
        "*": {"sampler": "sgld", "num_steps": 20, "step_size": 1.0, "sampler_noise": 0.01,
              "buffer_size": 10000, "reinit_probability": 0.05, "noise_scale": 0.03,
              "test_noise_scale": 0.03},
        "digits": {"epochs": 40, "learning_rate": 3e-3, "buffer_size": 2000, "num_steps": 20,
                   "noise_scale": 0.03, "test_noise_scale": 0.0, "warmup_steps": 100},
        "cifar": {"backbone": "wrn", "depth": 28, "width": 10, "norm": "none",
                  "optimizer": "adam", "learning_rate": 1e-4, "warmup_steps": 1000,
                  "epochs": 200, "decay_epochs": "160,180", "decay_factor": 0.3,
                  "num_validation": 5000},
    },
    # JEM++: ALGORITHMS.md 2.
    "jempp": {
        "*": {"sampler": "proximal", "num_steps": 10, "inner_steps": 5, "step_size": 0.2,
              "sampler_noise": 0.0, "gradient_clip": 1.0, "clip_samples": True,
              "buffer_init": "gaussian_mixture", "sample_in_training_mode": True,
              "noise_scale": 0.03, "norm": "batch"},
        # On 8x8 digits the clipped proximal steps overshoot and the data energy runs away
        # without an energy penalty (the JEM authors' remedy, JEM issue #4).
        "digits": {"epochs": 30, "learning_rate": 1e-3, "buffer_size": 2000,
                   "warmup_steps": 100, "energy_l2_weight": 0.1},
        "cifar": {"backbone": "wrn", "depth": 28, "width": 10, "optimizer": "sgd",
                  "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 4e-4,
                  "warmup_steps": 1000, "epochs": 150, "decay_epochs": "50,100,125",
                  "decay_factor": 0.2, "num_validation": 5000},
    },
    # SADA-JEM: ALGORITHMS.md 3.4.
    "sadajem": {
        "*": {"sampler": "sgld", "num_steps": 5, "step_size": 1.0, "sampler_noise": 0.0,
              "gradient_clip": 1.0, "clip_samples": True, "buffer_init": "gaussian_mixture",
              "sample_in_training_mode": True, "sam_rho": 2.0, "sam_adaptive": True,
              "augment_px": False, "noise_scale": 0.0, "divergence_threshold": 1e5,
              "norm": "batch"},
        # Without an energy penalty log p(x) separates digits from noise poorly here
        # (AUROC 0.93; 0.99 with it, see README).
        "digits": {"epochs": 30, "learning_rate": 1e-3, "buffer_size": 2000,
                   "batch_size": 64, "px_batch_size": 64, "warmup_steps": 100,
                   "sam_rho": 0.5, "energy_l2_weight": 0.1},
        "cifar": {"backbone": "wrn", "depth": 28, "width": 10, "optimizer": "sgd",
                  "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "warmup_steps": 1000, "epochs": 200, "decay_epochs": "60,120,180",
                  "decay_factor": 0.2, "batch_size": 128, "px_batch_size": 64,
                  "num_validation": 0},
    },
    # GMMC: ALGORITHMS.md 4.5 (the authors' cifar10_gen.sh and cifar10_joint.sh).
    "gmmc": {
        "*": {"mode": "joint", "center_scale": 10.0, "beta": 0.5, "start_generative": 50,
              "latent_noise": 0.001, "inject": False, "num_steps": 20, "step_size": 1.0,
              "clip_samples": True, "sampler_noise": 0.0, "noise_scale": 0.03},
        # Digits: a small buffer and 40 steps give every chain enough updates to look like a
        # digit; joint turns the generative loss on after 5 discriminative epochs. beta 1.0
        # collapses to about 50% accuracy here.
        "digits": {"epochs": 50, "learning_rate": 1e-3, "buffer_size": 500, "warmup_steps": 100,
                   "start_generative": 5, "num_steps": 40},
        "cifar": {"backbone": "wrn", "depth": 28, "width": 10, "norm": "none",
                  "optimizer": "adam", "learning_rate": 1e-4, "warmup_steps": 1000,
                  "num_validation": 5000},
        "cifar:generative": {"epochs": 100, "decay_epochs": "30,50,80", "decay_factor": 0.3,
                             "buffer_size": 100000, "reinit_probability": 0.025,
                             "num_steps": 20, "start_generative": 0},
        "cifar:joint": {"epochs": 150, "decay_epochs": "30,50,80,100,120", "decay_factor": 0.3,
                        "buffer_size": 50000, "reinit_probability": 0.05, "num_steps": 50,
                        "start_generative": 50},
        # The authors' cifar10_dis.sh calls a script missing from their repository; these are
        # the defaults of their train_gmmc.py.
        "cifar:discriminative": {"optimizer": "sgd", "learning_rate": 0.03, "momentum": 0.9,
                                 "norm": "batch", "epochs": 150,
                                 "decay_epochs": "50,80,100,120", "decay_factor": 0.3,
                                 "noise_scale": 0.0, "buffer_size": 100, "warmup_steps": 0},
    },
    # IGEBM: ALGORITHMS.md 5.2-5.3. On CIFAR the conditional ResNet32 (128-256-256, 2 blocks per
    # stage); the unconditional ResNet32Large is --conditional false --sn_filters 128
    # --sn_num_blocks 3 --dropout_rate 0.5.
    "igebm": {
        "*": {"conditional": True, "sampler": "sgld", "num_steps": 60, "step_size": 10.0,
              "sampler_noise": 0.005, "gradient_clip": 0.01, "clip_samples": True,
              "buffer_size": 10000, "reinit_probability": 0.05, "energy_l2_weight": 1.0,
              "optimizer": "adam", "learning_rate": 3e-4, "beta_1": 0.0, "beta_2": 0.999,
              "augment": "none", "augment_px": False, "noise_scale": 0.0,
              "sn_filters": "64", "sn_num_blocks": 1, "sn_pooling": "sum"},
        "digits": {"epochs": 30, "learning_rate": 1e-3, "buffer_size": 1000, "num_steps": 20,
                   "sn_filters": "32"},
        "cifar": {"batch_size": 128, "epochs": 100, "sn_filters": "128,256,256",
                  "sn_num_blocks": 2},
    },
}

DATASET_FAMILIES = {
    "digits": "digits",
    "synthetic": "digits",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "svhn": "cifar",
}


def register(model, presets):
    """Adds the presets of a model defined outside keras_jem (see `fit.EXTRA_BUILDERS`)."""
    PRESETS[model] = presets


def resolve(model, dataset, overrides=None):
    """The full configuration of a run: defaults < model < dataset < mode presets < overrides.

    Args:
        model: a key of `PRESETS`.
        dataset: a dataset name.
        overrides: dict of settings given by the user (None values are ignored).

    Returns:
        A dict with every key of `SETTINGS` plus "model" and "dataset".
    """
    if model not in PRESETS:
        raise ValueError(f"Unknown model {model!r}. Expected one of: {', '.join(PRESETS)}.")
    if dataset not in DATASET_FAMILIES:
        raise ValueError(
            f"Unknown dataset {dataset!r}. Expected one of: {', '.join(DATASET_FAMILIES)}."
        )
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "mode" in overrides:
        overrides["mode"] = MODE_ALIASES.get(overrides["mode"], overrides["mode"])
    config = dict(DEFAULTS)
    presets = PRESETS[model]
    family = DATASET_FAMILIES[dataset]
    config.update(presets.get("*", {}))
    config.update(presets.get(family, {}))
    config.update(presets.get(dataset, {}))
    mode = overrides.get("mode", config["mode"])
    config.update(presets.get(f"{family}:{mode}", {}))
    config.update(presets.get(f"{dataset}:{mode}", {}))
    for key, value in overrides.items():
        if value is not None:
            config[key] = value
    config["model"] = model
    config["dataset"] = dataset
    return config


# === Fashion-MNIST (28x28x1, 60000 training images) ===
# One block, kept together so it ports as a unit. Every model uses the same backbone, a
# Wide-ResNet-10-1 (77k parameters, 28 -> 28 -> 14 -> 7, 64 features), and the same budget of
# 1200 iterations of batch 64 (1.3 passes over the data), so the study compares methods, not
# networks or budgets. Sized on time: a JEM iteration (20 SGLD steps) costs about 23
# forward+backward passes, 4.3 CPU-s with a WRN-10-2 and about 4x less with this WRN-10-1; it
# took 1.56 s on this 2-core machine at load 3, so about 1 s idle and JEM about 20 minutes, the
# softmax a few. An "epoch" here is `steps_per_epoch` iterations, not a pass over the images.
DATASET_FAMILIES["fashion_mnist"] = "fashion_mnist"
_FASHION_MNIST = {"backbone": "wrn", "depth": 10, "width": 1, "optimizer": "adam",
                  "learning_rate": 1e-3, "warmup_steps": 200, "epochs": 6,
                  "steps_per_epoch": 200, "decay_epochs": "5", "decay_factor": 0.3}
PRESETS["softmax"]["fashion_mnist"] = {**_FASHION_MNIST, "noise_scale": 0.03}
# JEM: the energy penalty too. Without it, 36 iterations at the full rate (warm-up 5) ran the
# data energy to -23 and the cross-entropy up from 2.31 to 3.67; with 0.1 (warm-up 20, 60
# iterations) the energies stayed within +-3.5 and the cross-entropy went down, 2.30 -> 2.16.
PRESETS["jem"]["fashion_mnist"] = {**_FASHION_MNIST, "buffer_size": 5000,
                                   "test_noise_scale": 0.0, "energy_l2_weight": 0.1}
# JEM++ and SADA-JEM: the energy penalty their digits presets need (see there).
PRESETS["jempp"]["fashion_mnist"] = {**_FASHION_MNIST, "buffer_size": 5000,
                                     "energy_l2_weight": 0.1}
PRESETS["sadajem"]["fashion_mnist"] = {**_FASHION_MNIST, "buffer_size": 5000, "sam_rho": 0.5,
                                       "px_batch_size": 64, "energy_l2_weight": 0.1}
# GMMC joint: discriminative for the first 2 of 6 epochs, then generative (class blocks of 500).
# beta 0.1: after 200 discriminative iterations (test accuracy 40%), 100 generative ones with
# beta 0.5 ran the data's MMC energy from 40 to 208 and the test accuracy down to 20%; with 0.1
# the energy went to 50 and the accuracy up to 51%.
PRESETS["gmmc"]["fashion_mnist"] = {**_FASHION_MNIST, "buffer_size": 5000,
                                    "start_generative": 2, "beta": 0.1}
# IGEBM (its own spectral-norm ResNet, generation only): with the digits width 32 (32-64-128) an
# iteration cost about 6 JEM iterations here, so the width is 16 (1.3 s per iteration at load 3)
# and the budget 600 iterations.
PRESETS["igebm"]["fashion_mnist"] = {"epochs": 6, "steps_per_epoch": 100,
                                     "learning_rate": 1e-3, "buffer_size": 5000,
                                     "num_steps": 20, "sn_filters": "16"}
