"""Samplers and the replay buffer: one interface for every method."""

from keras_jem.sampling.fifo_buffer import FIFOReplayBuffer
from keras_jem.sampling.latent_target import LatentTargetSampler
from keras_jem.sampling.mala import MALA
from keras_jem.sampling.noise import next_seed
from keras_jem.sampling.proximal import ProximalSGLD
from keras_jem.sampling.replay_buffer import ReplayBuffer
from keras_jem.sampling.sampler import Sampler
from keras_jem.sampling.sampler import deserialize
from keras_jem.sampling.sampler import serialize
from keras_jem.sampling.sgld import SGLD
