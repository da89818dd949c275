"""Text for the language models: `jattn.examples.text` (the Python standard library's sources as
byte tokens, or your own files), which `jattn demo` uses too; this module keeps the name the
training scripts import."""

from jattn.examples.text import VOCAB_SIZE as VOCAB_SIZE
from jattn.examples.text import TextCorpus as TextCorpus
from jattn.examples.text import decode as decode
from jattn.examples.text import encode as encode
from jattn.examples.text import expand_paths as expand_paths
from jattn.examples.text import load_corpus as load_corpus
from jattn.examples.text import stdlib_sources as stdlib_sources
