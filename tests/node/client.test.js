// Calls llmasos.v1.Kernel from Node.js, from the .proto files as they stand (protoc -I proto):
// Spawn, Read (streaming), Wait, Ps, Kill and error statuses against a real llmosd.
//   node tests/node/client.test.js ADDR TOKEN
// Prints one JSON line of what it saw; exits non-zero on the first failed check.
"use strict";
const assert = require("node:assert/strict");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [addr, token] = process.argv.slice(2);
if (!addr || !token) {
  console.error("usage: node client.test.js ADDR TOKEN");
  process.exit(2);
}
const PROTO = path.resolve(__dirname, "..", "..", "proto");
const def = loader.loadSync("kernel.proto", {
  includeDirs: [PROTO], keepCase: true, longs: String, enums: String, defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(def).llmasos.v1;
const kernel = new v1.Kernel(addr, grpc.credentials.createInsecure());

function md(tok = token) {
  const m = new grpc.Metadata();
  m.add("authorization", `Bearer ${tok}`);
  return m;
}
function call(method, req, tok) {
  return new Promise((resolve, reject) =>
    kernel[method](req, md(tok), { deadline: Date.now() + 300000 },
      (err, reply) => (err ? reject(err) : resolve(reply))));
}
function read(pid) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const stream = kernel.Read({ pid }, md());
    stream.on("data", (c) => chunks.push(c));
    stream.on("error", reject);
    stream.on("end", () => resolve(chunks));
  });
}
async function status(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code;
  }
  throw new Error("expected an error status");
}

async function main() {
  const prompt = process.env.LLMASOS_PROMPT || "The capital of France is";
  const sampling = { temperature: 0, max_tokens: 8 };
  // Spawn, then Read the output as it comes, then Wait to reap it and get the whole text.
  const spawned = await call("Spawn", { model: "smollm2-135m", prompt, sampling, name: "node" });
  const pid = spawned.pid;
  const chunks = await read(pid);
  const last = chunks[chunks.length - 1];
  assert.equal(last.done, true);
  assert.equal(last.exit_reason, "EXIT_LENGTH");
  const streamed = chunks.map((c) => c.text).join("");
  const waited = await call("Wait", { pid });
  assert.equal(waited.text, streamed);
  assert.equal(waited.info.state, "PROC_REAPED");
  assert.equal(waited.token_ids.length, 8);

  // Ps lists a live job; Kill ends it at its next token boundary; Wait reports it killed.
  const long = await call("Spawn", {
    model: "smollm2-135m", prompt, name: "node-kill",
    sampling: { temperature: 0, max_tokens: 4000, ignore_eos: true },
  });
  const ps = await call("Ps", { all: true });
  const row = ps.processes.find((p) => p.pid === long.pid);
  assert.ok(row, "Ps lists the spawned job");
  assert.equal(row.name, "node-kill");
  await call("Kill", { pid: long.pid, signal: "SIGKILL" });
  const killed = await call("Wait", { pid: long.pid });
  assert.equal(killed.info.exit_reason, "EXIT_KILLED");

  // Errors carry their gRPC status.
  const unknownModel = await status(call("Spawn", { model: "no-such-model", prompt }));
  assert.equal(unknownModel, grpc.status.NOT_FOUND);
  const badPid = await status(call("Stat", { pid: 0 }));
  assert.equal(badPid, grpc.status.INVALID_ARGUMENT);
  const badToken = await status(call("WhoAmI", {}, "not-a-token"));
  assert.equal(badToken, grpc.status.UNAUTHENTICATED);

  console.log(JSON.stringify({
    pid, text: waited.text, token_ids: waited.token_ids.map(Number), chunks: chunks.length,
    killed: long.pid, statuses: { unknownModel, badPid, badToken },
  }));
  kernel.close();
}

main().catch((err) => {
  console.error(err.stack || err);
  process.exit(1);
});
