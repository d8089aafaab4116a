"""The machinery of the `encode_images` stage (pipeline/stages/encode_images.py), one module per concern:

- `plan`: what to encode: the records cut into groups and chunks, each chunk keyed by what decides its content;
- `decode`: decode workers (DataLoader processes) that read and preprocess images, and what they send back;
- `tuner`: how many decode workers, adapted while the run goes;
- `loop`: the main process's side: decoded parts joined into batches, batches through the vision tower,
  embeddings into chunks, complete chunks into the pool;
- `embeddings`: the chunk files of image embeddings: their schema, writing, and reading back.

The units of work, each with one name:

- **group**: what the plan hands out, one at a time, to a shard (a process's share of a job) and a decode worker:
  a planned chunk for sources with a record per image (folder, manifest, bucket), a whole tar file for tar
  sources, whose images fill chunks in stored order;
- **chunk**: the unit of checkpoint, a file in the stage's pool (about `encode.chunk_size` images);
- **segment**: consecutive groups decoded by one set of workers (the tuner may change the count between them);
- **batch**: the images that go through the vision tower at once; a batch never straddles chunks;
- **part**: the share of a batch one worker decodes and sends (`DecodedPart`); a tar file's batches are one part.
"""
