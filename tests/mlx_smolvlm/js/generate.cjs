// Greedy generation with transformers.js on an ONNX export, from inputs prepared in Python.
//
// node generate.cjs REQUEST.json: the request names the export directory, the dtype, the new
// token count and raw little-endian files holding input_ids (int64), pixel_values (float32)
// and pixel_attention_mask (uint8) with their shapes. Prints {"tokens": [...]} on stdout.
// TRANSFORMERS_JS_DIR is the directory whose node_modules holds @huggingface/transformers.
const fs = require("node:fs");
const path = require("node:path");
const { createRequire } = require("node:module");

const { env, AutoModelForVision2Seq, Tensor } = createRequire(
  path.join(process.env.TRANSFORMERS_JS_DIR, "package.json"),
)("@huggingface/transformers");

function tensor(type, file, dims) {
  const bytes = fs.readFileSync(file);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const data = {
    int64: () => new BigInt64Array(buffer),
    float32: () => new Float32Array(buffer),
    bool: () => new Uint8Array(buffer),
  }[type]();
  return new Tensor(type, data, dims);
}

async function main() {
  const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = path.dirname(request.model_dir);
  const model = await AutoModelForVision2Seq.from_pretrained(path.basename(request.model_dir), {
    dtype: request.dtype,
  });
  const input_ids = tensor("int64", request.input_ids.file, request.input_ids.dims);
  const inputs = {
    input_ids,
    attention_mask: new Tensor(
      "int64",
      new BigInt64Array(input_ids.data.length).fill(1n),
      input_ids.dims,
    ),
    pixel_values: tensor("float32", request.pixel_values.file, request.pixel_values.dims),
    pixel_attention_mask: tensor(
      "bool",
      request.pixel_attention_mask.file,
      request.pixel_attention_mask.dims,
    ),
  };
  const output = await model.generate({
    ...inputs,
    max_new_tokens: request.max_new_tokens,
    do_sample: false,
  });
  const tokens = Array.from(output.data, Number).slice(input_ids.dims[1]);
  process.stdout.write(JSON.stringify({ tokens }) + "\n");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
