"""The command-line flags of `trainers.fit`: where each one goes and whose default it is.

`FLAGS` maps each flag to its section and constructor keyword (`Flag`); `trainers.presets`
resolves their values, `trainers.fit` builds its argument parser from them.
"""

import collections

SECTIONS = ("run", "data", "backbone", "model", "sampler", "sam", "optimizer")

# A flag: where it goes (section, keyword), its type, help, and the class whose signature holds
# its default ("module:Class"; None: the default is the trainer's, in `COMMON`).
Flag = collections.namedtuple("Flag", "section key type help source")

FLAGS = {
    # Run.
    "model_dir": Flag("run", "model_dir", str,
                      "where checkpoints, logs, samples and the model go", None),
    "epochs": Flag("run", "epochs", int, "number of epochs", None),
    "steps_per_epoch": Flag("run", "steps_per_epoch", int,
                            "steps per epoch (default: examples / px_batch_size)", None),
    "seed": Flag("run", "seed", int, "random seed", None),
    "jit_compile": Flag("run", "jit_compile", str, (
        "XLA: auto (on with a GPU or TPU; off on CPUs, where it is slower), true or false"),
        None),
    "save_freq": Flag("run", "save_freq", str,
                      "backup frequency: 'epoch' or a number of steps", None),
    "keep_backups": Flag("run", "keep_backups", int, (
        "backups kept in MODEL_DIR/backup, the newest N (with --save_freq epoch: the last N "
        "epochs, e.g. for trainers.sample --task ensemble --checkpoints N)"), None),
    "mixed_precision": Flag("run", "mixed_precision", str, (
        "compute dtype policy: none (float32), mixed_bfloat16 (CPUs with AVX512-BF16, TPUs) or "
        "mixed_float16 (GPUs); variables, energies, sampler chains and the buffer stay float32"),
        None),
    "strategy": Flag("run", "strategy", str,
                     "tf.distribute strategy: default, mirrored, multi_worker, tpu", None),
    "num_devices": Flag("run", "num_devices", int,
                        "mirrored replicas: the first N GPUs (no GPU: N logical CPUs)", None),
    "tpu": Flag("run", "tpu", str,
                "TPU name or address for --strategy tpu (default: TPU_NAME or local)", None),
    "reestimate_batch_norm": Flag("run", "reestimate_batch_norm", bool, (
        "after training, set the BatchNorm moving statistics to those of up to 10,000 clean "
        "training images (keras_jem.reestimate_batch_norm); no effect without BatchNorm"), None),
    "sample_every": Flag("run", "sample_every", int,
                         "write a PNG grid of samples every N epochs (0: never)", None),
    "max_rollbacks": Flag("run", "max_rollbacks", int,
                          "rollbacks to the last checkpoint on divergence before giving up",
                          None),
    "verbose": Flag("run", "verbose", str,
                    "progress: auto (bar on a TTY, one line per epoch otherwise), 0-2", None),
    # Data.
    "data_dir": Flag("data", "data_dir", str,
                     "TFDS data directory (default ~/tensorflow_datasets)", None),
    "manual_dir": Flag("data", "manual_dir", str,
                       "directory with the dataset archives, prepared offline by TFDS", None),
    "download": Flag("data", "download", bool,
                     "let TFDS download the dataset (needs internet)", None),
    "num_validation": Flag("data", "num_validation", int,
                           "training images held out for validation", None),
    "batch_size": Flag("data", "batch_size", int, "batch size of the cross-entropy stream",
                       "keras_jem.data:make_train_dataset"),
    "px_batch_size": Flag("data", "px_batch_size", int,
                          "batch size of the likelihood stream (default: batch_size)",
                          "keras_jem.data:make_train_dataset"),
    "augment": Flag("data", "augment", str,
                    "crop_flip, crop or none (default: the dataset's)", None),
    "augment_px": Flag("data", "augment_px", bool,
                       "augment the likelihood stream too (SADA-JEM: no)", None),
    "noise_scale": Flag("data", "noise_scale", float, "Gaussian noise added to training images",
                        "keras_jem.data:make_train_dataset"),
    "test_noise_scale": Flag("data", "test_noise_scale", float,
                             "Gaussian noise added to test images (JEM: 0.03)", None),
    # Backbone.
    "backbone": Flag("backbone", "name", str, "small_cnn or wrn", None),
    "depth": Flag("backbone", "depth", int, "Wide-ResNet depth",
                  "keras_jem.backbones:WideResNet"),
    "width": Flag("backbone", "width", int, "Wide-ResNet width",
                  "keras_jem.backbones:WideResNet"),
    "norm": Flag("backbone", "norm", str, "none, batch, group, instance or layer",
                 "keras_jem.backbones:SmallCNN"),
    "dropout_rate": Flag("backbone", "dropout_rate", float, "dropout inside the backbone",
                         "keras_jem.backbones:SmallCNN"),
    # Optimizer and learning-rate schedule.
    "optimizer": Flag("optimizer", "name", str, "adam, clipped_adam (IGEBM's) or sgd", None),
    "learning_rate": Flag("optimizer", "learning_rate", float, "learning rate after warm-up",
                          None),
    "momentum": Flag("optimizer", "momentum", float, "SGD momentum", None),
    "beta_1": Flag("optimizer", "beta_1", float, "Adam beta_1", "keras.optimizers:Adam"),
    "beta_2": Flag("optimizer", "beta_2", float, "Adam beta_2", "keras.optimizers:Adam"),
    "weight_decay": Flag("model", "weight_decay", float,
                         "coupled L2 weight decay (PyTorch style)", "keras_jem.models.energy_model:EnergyModel"),
    "warmup_steps": Flag("optimizer", "warmup_steps", int, "linear learning-rate warm-up steps",
                         "keras_jem.optimizers:WarmupPiecewiseConstant"),
    "decay_epochs": Flag("optimizer", "decay_epochs", str,
                         "comma-separated epochs where the rate is multiplied by decay_factor",
                         None),
    "decay_factor": Flag("optimizer", "decay_factor", float,
                         "learning-rate multiplier at each decay epoch", None),
    "clipnorm": Flag("optimizer", "clipnorm", float, "clip each gradient to this norm",
                     "keras.optimizers:Adam"),
    # Model.
    "buffer_size": Flag("model", "buffer_size", int, "replay buffer size", "keras_jem:JEM"),
    "buffer_init": Flag("model", "buffer_init", str, "uniform or gaussian_mixture",
                        "keras_jem:JEM"),
    "buffer_type": Flag("model", "buffer_type", str, (
        "persistent (chains written back in place) or fifo (a ring of the latest samples in 8 "
        "bits, class-agnostic: IGEBM's official buffer)"),
        "keras_jem.models.energy_model:EnergyModel"),
    "buffer_covariance": Flag("model", "buffer_covariance", str,
                              "full or diagonal class covariances (gaussian_mixture)",
                              "keras_jem.models.energy_model:EnergyModel"),
    "reinit_probability": Flag("model", "reinit_probability", float,
                               "probability of restarting a chain", "keras_jem:JEM"),
    "conditional_sampling": Flag("model", "conditional_sampling", bool,
                                 "draw p(x) samples class-conditionally", "keras_jem:JEM"),
    "px_weight": Flag("model", "px_weight", float, "weight of the log p(x) term",
                      "keras_jem:JEM"),
    "pyx_weight": Flag("model", "pyx_weight", float, "weight of the cross-entropy term",
                       "keras_jem:JEM"),
    "pxy_weight": Flag("model", "pxy_weight", float, "weight of the log p(x, y) term",
                       "keras_jem:JEM"),
    "energy_l2_weight": Flag("model", "energy_l2_weight", float, "L2 penalty on energies",
                             "keras_jem.models.energy_model:EnergyModel"),
    "divergence_threshold": Flag("model", "divergence_threshold", float,
                                 "loss/energy magnitude treated as divergence", "keras_jem.models.energy_model:EnergyModel"),
    "buffer_uniform_fraction": Flag("model", "buffer_uniform_fraction", float, (
        "with --buffer_init gaussian_mixture: the fraction of chain restarts from uniform "
        "noise"), "keras_jem.models.energy_model:EnergyModel"),
    "sample_in_training_mode": Flag("model", "sample_in_training_mode", bool,
                                    "BatchNorm in training mode while sampling", "keras_jem.models.energy_model:EnergyModel"),
    # Sampler.
    "sampler": Flag("sampler", "name", str, "sgld or proximal", None),
    "num_steps": Flag("sampler", "num_steps", int, "sampler steps per training iteration",
                      "keras_jem.sampling:SGLD"),
    "inner_steps": Flag("sampler", "inner_steps", int, "proximal sampler inner steps",
                        "keras_jem.sampling:ProximalSGLD"),
    "step_size": Flag("sampler", "step_size", float, "sampler step size",
                      "keras_jem.sampling:SGLD"),
    "sampler_noise": Flag("sampler", "noise_scale", float, "sampler noise standard deviation",
                          "keras_jem.sampling:SGLD"),
    "gradient_clip": Flag("sampler", "gradient_clip", float,
                          "per-element clip of the sampler gradient", "keras_jem.sampling:SGLD"),
    "clip_samples": Flag("sampler", "clip_range", bool,
                         "clamp samples to the data range [-1, 1]", "keras_jem.sampling:SGLD"),
    "noise_first": Flag("sampler", "noise_first", bool, (
        "sgld: add the noise before each gradient step, the gradient taken at the noisy x "
        "(IGEBM's official order; default: after it, JEM's)"), "keras_jem.sampling:SGLD"),
    # SAM.
    "sam_rho": Flag("sam", "rho", float, "SAM radius (0: no SAM)", None),
    "sam_adaptive": Flag("sam", "adaptive", bool, "adaptive SAM (ASAM)",
                         "keras_jem.optimizers:SAM"),
    # GMMC (--model gmmc only).
    "mode": Flag("model", "mode", str,
                 "GMMC training mode: discriminative (dis), generative (gen) or joint",
                 "keras_jem:GMMC"),
    "center_scale": Flag("model", "center_scale", float,
                         "GMMC: norm of the Max-Mahalanobis class centres", "keras_jem:GMMC"),
    "beta": Flag("model", "beta", float,
                 "GMMC: weight of the sample energies in the generative loss", "keras_jem:GMMC"),
    "start_generative": Flag("model", "start_generative", int,
                             "GMMC joint: first epoch with the generative loss",
                             "keras_jem:GMMC"),
    "latent_noise": Flag("sampler", "latent_noise", float,
                         "GMMC sampler: noise of the latent target mu_y + noise",
                         "keras_jem.sampling:LatentTargetSampler"),
    "inject": Flag("sampler", "inject", bool,
                   "GMMC sampler: draw a new latent target at every step",
                   "keras_jem.sampling:LatentTargetSampler"),
    # IGEBM (--model igebm only).
    "conditional": Flag("backbone", "conditional", bool,
                        "IGEBM: class-conditional energy E(x, y)", None),
    "sn_filters": Flag("backbone", "filters", str,
                       "IGEBM SNResNet widths: a base width or one per stage, e.g. 128,256",
                       "keras_jem.backbones:SNResNet"),
    "sn_num_blocks": Flag("backbone", "num_blocks", int, "IGEBM: residual blocks per stage",
                          "keras_jem.backbones:SNResNet"),
    "sn_pooling": Flag("backbone", "pooling", str, "IGEBM: feature pooling, sum or mean",
                       "keras_jem.backbones:SNResNet"),
}

# Flags that only one model reads: giving them to another model is an error.
MODEL_SETTINGS = {
    "gmmc": ("mode", "center_scale", "beta", "start_generative", "latent_noise", "inject"),
    "igebm": ("conditional", "sn_filters", "sn_num_blocks", "sn_pooling"),
}

# The keyword arguments each model class takes from the "model" section.
MODEL_ARGUMENTS = {
    "jem": ("buffer_size", "buffer_init", "buffer_covariance", "reinit_probability",
            "conditional_sampling", "px_weight", "pyx_weight", "pxy_weight", "energy_l2_weight",
            "sample_in_training_mode", "divergence_threshold", "weight_decay",
            "buffer_uniform_fraction", "buffer_type"),
    "gmmc": ("mode", "center_scale", "beta", "start_generative", "buffer_size",
             "reinit_probability", "energy_l2_weight", "sample_in_training_mode",
             "divergence_threshold", "weight_decay", "buffer_type"),
    "igebm": ("buffer_size", "reinit_probability", "energy_l2_weight", "divergence_threshold",
              "sample_in_training_mode", "buffer_type"),
}
for _name in ("softmax", "jempp", "sadajem"):
    MODEL_ARGUMENTS[_name] = MODEL_ARGUMENTS["jem"]

GMMC_MODES = ("discriminative", "generative", "joint")
MODE_ALIASES = {"dis": "discriminative", "gen": "generative"}
