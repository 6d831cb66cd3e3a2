"""The JEM-family models, one public class per file."""

from keras_jem.models.energy_model import EnergyModel
from keras_jem.models.gmmc import GMMC
from keras_jem.models.igebm import IGEBM
from keras_jem.models.jem import JEM
from keras_jem.models.jem_pp import JEMPP
from keras_jem.models.sada_jem import SADAJEM
from keras_jem.models.transition_ebm import TransitionEBM
