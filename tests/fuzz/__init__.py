"""Property-based fuzzing of the model-file and checkpoint readers (hypothesis).

- `seeds`: small real files to start from (a tiny model as minillm single files, two GGUFs,
  checkpoints of a tiny session), built in a few seconds without torch.
- `mutate`: hypothesis strategies that describe a damaged file as data (the seed's name plus a
  list of mutations), and the functions that turn such a description into bytes.
- `targets`: what each reader must do with any file: load it, or refuse it with one
  MiniLLMError; never another exception, never past a time or memory bound.
- `corpus`: the descriptions of inputs that once broke a reader (tests/fuzz_corpus/<reader>/).
- `campaign` (`python -m fuzz`): the long campaign behind `make fuzz`.

tests/test_fuzz.py replays the corpus and runs a few derandomized examples per reader.
"""
