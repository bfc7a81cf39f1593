#!/usr/bin/env node
// Validates the Kubernetes manifests in deploy/k8s (run by tests/k8s/validate.sh).
//
//   node validate.cjs --k8s DIR --src REPO [--kubectl PATH] [--self-test]
//
// For every manifest file, and for every kustomize root rendered with
// `kubectl kustomize` (when --kubectl is given):
//   schema   each object against the Kubernetes API schemas of the npm package
//            kubernetes-models (an MPIJob against mpijob-v2beta1.schema.json, its
//            pod templates against the Kubernetes PodTemplateSpec schema), plus
//            unknown fields (a typo'd field is rejected, as `kubectl apply
//            --validate=strict` would)
//   env      every env name a container sets is one dtrain reads: the set is
//            taken from the C++ sources (getenv, CLI11 envname, the EnvReader
//            and env_* helpers in launcher/ comm/ parallel/ engine/)
//   flags    every --flag given to `dtrain <command>` is one that command defines
//            (add_option/add_flag in the file that adds the subcommand)
//   wiring   (rendered sets) coordinator --world-size = Job completions =
//            parallelism = DTRAIN_WORLD_SIZE; DTRAIN_COORDINATOR names the
//            coordinator Service and port; rank from the completion index; job id
//            and token agree; ring bind/advertise; headless Service for the
//            subdomain; GPUs requested where --device cuda; checkpoint folder on
//            a shared volume mounted at the same path by the coordinator;
//            MPIJob -np = Worker replicas x slotsPerWorker.
// --self-test breaks copies of the rendered objects and of the sources and checks
// that each break is reported (so the checks can fail).
//
// Prints one line per failure and a closing "N passed, N failed" line; exits 1 on
// any failure.
"use strict";

const fs = require("fs");
const path = require("path");
const { execFileSync } = require("child_process");
const YAML = require("yaml");
const Ajv = require("ajv");

// ---------------------------------------------------------------- arguments

function parseArgs(argv) {
  const o = { k8s: "", src: "", kubectl: "", selfTest: false };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--k8s") o.k8s = argv[++i];
    else if (a === "--src") o.src = argv[++i];
    else if (a === "--kubectl") o.kubectl = argv[++i];
    else if (a === "--self-test") o.selfTest = true;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!o.k8s || !o.src) throw new Error("usage: validate.cjs --k8s DIR --src REPO [--kubectl PATH]");
  return o;
}

// ---------------------------------------------------------------- sources

function walk(dir, exts, out = []) {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, exts, out);
    else if (exts.some((x) => e.name.endsWith(x))) out.push(p);
  }
  return out;
}

// The environment variables dtrain reads, from its C++ sources.
function envNamesFromSources(srcRoot) {
  const name = "([A-Za-z_][A-Za-z0-9_]*)";
  const patterns = [
    new RegExp(`\\bgetenv\\(\\s*"${name}"`, "g"), // std::getenv("X")
    new RegExp(`\\benvname\\(\\s*"${name}"`, "g"), // CLI11 ->envname("X")
    new RegExp(`\\b\\w+\\(\\s*env\\s*,\\s*"${name}"`, "g"), // get(env, "X"), required(env, "X", ...)
    new RegExp(`\\benv_\\w+\\(\\s*"${name}"`, "g"), // env_int("X", ...), env_bytes, env_algo
  ];
  const names = new Map(); // name -> first file that reads it
  for (const dir of ["launcher", "comm", "parallel", "engine"]) {
    const d = path.join(srcRoot, dir);
    if (!fs.existsSync(d)) continue;
    for (const f of walk(d, [".cc", ".h", ".cu", ".cpp"])) {
      const text = fs.readFileSync(f, "utf8");
      for (const re of patterns) {
        for (const m of text.matchAll(re)) {
          if (!names.has(m[1])) names.set(m[1], path.relative(srcRoot, f));
        }
      }
    }
  }
  return names;
}

// The flags of each dtrain subcommand: add_option/add_flag in the file that adds it.
function flagsFromSources(srcRoot) {
  const files = walk(path.join(srcRoot, "launcher", "src"), [".cc"]);
  const commands = new Map();
  for (const f of files) {
    const text = fs.readFileSync(f, "utf8");
    const subs = [...text.matchAll(/app\.add_subcommand\(\s*"([a-z-]+)"/g)].map((m) => m[1]);
    if (subs.length === 0) continue;
    const flags = new Set(["--help"]);
    for (const m of text.matchAll(/add_(?:option|flag)\(\s*"([^"]+)"/g)) {
      for (let f2 of m[1].split(",")) {
        f2 = f2.trim().replace(/^!/, "");
        if (f2.startsWith("-")) flags.add(f2);
      }
    }
    for (const s of subs) commands.set(s, flags);
  }
  return commands;
}

// ---------------------------------------------------------------- schemas

const mpiJobSchema = JSON.parse(
  fs.readFileSync(path.join(__dirname, "mpijob-v2beta1.schema.json"), "utf8"),
);
const ajv = new Ajv({ allErrors: true, strict: true });
const validateMpiJobShape = ajv.compile(mpiJobSchema);

function modelFor(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string") return null;
  if (!/^[A-Za-z0-9.\-/]+$/.test(apiVersion) || !/^[A-Za-z]+$/.test(kind)) return null;
  try {
    const mod = require(`kubernetes-models/${apiVersion}/${kind}`);
    return mod[kind] || null;
  } catch {
    return null;
  }
}

// ajv errors of `model` on `obj` ([] when valid).
function modelErrors(model, obj) {
  try {
    model.prototype.validate.call(obj);
    return [];
  } catch (e) {
    if (!e.errors) throw e;
    return e.errors;
  }
}

const pointer = (parts) =>
  parts.map((p) => "/" + String(p).replace(/~/g, "~0").replace(/\//g, "~1")).join("");

function setAt(obj, parts, value) {
  let o = obj;
  for (let i = 0; i < parts.length - 1; i++) o = o[parts[i]];
  o[parts[parts.length - 1]] = value;
}

// Fields the schema does not know: replacing a known field's value with a value of
// no Kubernetes type (an array of arrays of arrays) makes the schema complain at that
// path; an unknown field is not looked at.
function unknownFields(model, root, base = []) {
  const out = [];
  const sentinel = [[["\u0000"]]];
  const visit = (val, parts) => {
    if (Array.isArray(val)) {
      val.forEach((v, i) => visit(v, [...parts, i]));
      return;
    }
    if (!val || typeof val !== "object") return;
    for (const k of Object.keys(val)) {
      const p = [...parts, k];
      if (parts.length === 0 && (k === "apiVersion" || k === "kind")) continue;
      const copy = structuredClone(root);
      setAt(copy, p, sentinel);
      const ptr = pointer(p);
      const hit = modelErrors(model, copy).some(
        (e) => e.instancePath === ptr || e.instancePath.startsWith(ptr + "/"),
      );
      if (!hit) out.push(pointer([...base, ...p]));
      else visit(val[k], p);
    }
  };
  visit(root, []);
  return out;
}

function ajvText(errors, prefix = "") {
  return errors
    .map((e) => {
      const extra = e.params && e.params.additionalProperty ? ` (${e.params.additionalProperty})` : "";
      return `${prefix}${e.instancePath || "/"} ${e.message}${extra}`;
    })
    .join("; ");
}

// Schema errors of one object (strings).
function schemaErrors(obj) {
  const errs = [];
  if (!obj || typeof obj !== "object") return ["not a mapping"];
  if (obj.apiVersion === "kubeflow.org/v2beta1" && obj.kind === "MPIJob") {
    if (!validateMpiJobShape(obj)) errs.push(ajvText(validateMpiJobShape.errors));
    const { PodTemplateSpec } = require("kubernetes-models/v1/PodTemplateSpec");
    const specs = (obj.spec && obj.spec.mpiReplicaSpecs) || {};
    for (const [role, rs] of Object.entries(specs)) {
      if (!rs || typeof rs.template !== "object") continue;
      const base = ["spec", "mpiReplicaSpecs", role, "template"];
      const e = modelErrors(PodTemplateSpec, rs.template);
      if (e.length) errs.push(ajvText(e, pointer(base)));
      else {
        for (const u of unknownFields(PodTemplateSpec, rs.template, base)) {
          errs.push(`${u}: unknown field`);
        }
      }
    }
    return errs;
  }
  const model = modelFor(obj.apiVersion, obj.kind);
  if (!model) return [`no schema for apiVersion ${obj.apiVersion} kind ${obj.kind}`];
  const e = modelErrors(model, obj);
  if (e.length) return [ajvText(e)];
  for (const u of unknownFields(model, obj)) errs.push(`${u}: unknown field`);
  return errs;
}

// ---------------------------------------------------------------- pods and containers

// [{podSpec, labels, where}] of an object.
function podTemplates(obj) {
  const out = [];
  const spec = obj.spec || {};
  if (obj.kind === "MPIJob") {
    for (const [role, rs] of Object.entries(spec.mpiReplicaSpecs || {})) {
      if (rs && rs.template) {
        out.push({
          pod: rs.template.spec || {},
          labels: (rs.template.metadata || {}).labels || {},
          where: `MPIJob/${obj.metadata.name} ${role}`,
          role,
          replicas: rs.replicas === undefined ? 1 : rs.replicas,
        });
      }
    }
  } else if (spec.template) {
    out.push({
      pod: spec.template.spec || {},
      labels: (spec.template.metadata || {}).labels || {},
      where: `${obj.kind}/${obj.metadata && obj.metadata.name}`,
    });
  } else if (obj.kind === "Pod") {
    out.push({ pod: spec, labels: (obj.metadata || {}).labels || {}, where: `Pod/${obj.metadata.name}` });
  }
  return out;
}

const allContainers = (pod) => [...(pod.initContainers || []), ...(pod.containers || [])];

// The dtrain invocation of a container: {command, args: [...after the subcommand]}.
function dtrainCall(c) {
  const argv = [...(c.command || []), ...(c.args || [])].map(String);
  const i = argv.findIndex((t) => t === "dtrain" || t.endsWith("/dtrain"));
  if (i < 0 || i + 1 >= argv.length) return null;
  return { command: argv[i + 1], args: argv.slice(i + 2), before: argv.slice(0, i) };
}

// --flag value pairs (also --flag=value); flags without a value map to true.
function flagValues(args) {
  const m = new Map();
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (!a.startsWith("--")) continue;
    const eq = a.indexOf("=");
    if (eq > 0) m.set(a.slice(0, eq), a.slice(eq + 1));
    else if (i + 1 < args.length && !args[i + 1].startsWith("--")) m.set(a, args[++i]);
    else m.set(a, true);
  }
  return m;
}

function envOf(c) {
  const m = new Map();
  for (const e of c.env || []) m.set(e.name, e);
  return m;
}

function gpuCount(c, which) {
  const r = (c.resources || {})[which] || {};
  const v = r["nvidia.com/gpu"];
  return v === undefined ? 0 : Number(v);
}

// ---------------------------------------------------------------- per-object checks

function envAndFlagErrors(obj, ctx) {
  const errs = [];
  for (const t of podTemplates(obj)) {
    for (const c of allContainers(t.pod)) {
      for (const e of c.env || []) {
        if (!ctx.envNames.has(e.name)) {
          errs.push(`${t.where} container ${c.name}: env ${e.name} is not read by dtrain`);
        }
      }
      const call = dtrainCall(c);
      if (!call) continue;
      const flags = ctx.commands.get(call.command);
      if (!flags) {
        errs.push(`${t.where} container ${c.name}: dtrain has no command '${call.command}'`);
        continue;
      }
      for (const a of call.args) {
        if (!a.startsWith("--")) continue;
        const f = a.split("=")[0];
        if (!flags.has(f)) {
          errs.push(`${t.where} container ${c.name}: 'dtrain ${call.command}' has no flag ${f}`);
        }
      }
    }
  }
  return errs;
}

// ---------------------------------------------------------------- set (wiring) checks

const isLoopback = (a) => /^(127\.|localhost$|::1$|\[::1\]$)/.test(String(a));
const matches = (selector, labels) =>
  selector && Object.keys(selector).length > 0 &&
  Object.entries(selector).every(([k, v]) => labels[k] === v);

function portNumber(container, port) {
  if (typeof port === "number") return port;
  const p = (container.ports || []).find((x) => x.name === port);
  return p ? p.containerPort : NaN;
}

// The pod's PVC-backed mounts of a container: mountPath -> claimName.
function pvcMounts(pod, c) {
  const vols = new Map();
  for (const v of pod.volumes || []) {
    if (v.persistentVolumeClaim) vols.set(v.name, v.persistentVolumeClaim.claimName);
  }
  const m = new Map();
  for (const vm of c.volumeMounts || []) {
    if (vols.has(vm.name)) m.set(vm.mountPath.replace(/\/+$/, ""), vols.get(vm.name));
  }
  return m;
}

// The claim holding `dir` in container c (null when none).
function claimFor(pod, c, dir) {
  let best = null;
  for (const [mp, claim] of pvcMounts(pod, c)) {
    if ((dir === mp || dir.startsWith(mp + "/")) && (!best || mp.length > best.mp.length)) {
      best = { mp, claim };
    }
  }
  return best;
}

function wiringErrors(objs) {
  const errs = [];
  const byKind = (k) => objs.filter((o) => o.kind === k);
  const services = byKind("Service");
  const pvcs = new Set(byKind("PersistentVolumeClaim").map((o) => o.metadata.name));
  let calls = 0;

  // Every claim a pod uses is in the set.
  for (const o of objs) {
    for (const t of podTemplates(o)) {
      for (const v of t.pod.volumes || []) {
        if (v.persistentVolumeClaim && !pvcs.has(v.persistentVolumeClaim.claimName)) {
          errs.push(`${t.where}: volume ${v.name} uses PVC ${v.persistentVolumeClaim.claimName}, which is not in the set`);
        }
      }
      for (const c of allContainers(t.pod)) {
        const call = dtrainCall(c);
        if (call) calls++;
        // Extended resources: requests must equal limits.
        const rq = gpuCount(c, "requests");
        const lm = gpuCount(c, "limits");
        if ((rq || lm) && rq !== lm && rq && lm) {
          errs.push(`${t.where} container ${c.name}: nvidia.com/gpu requests ${rq} != limits ${lm}`);
        }
      }
    }
  }
  if (calls === 0) errs.push("no container runs dtrain");

  // The coordinator.
  const coords = [];
  for (const d of byKind("Deployment")) {
    for (const t of podTemplates(d)) {
      for (const c of t.pod.containers || []) {
        const call = dtrainCall(c);
        if (call && call.command === "coordinator") coords.push({ d, t, c, flags: flagValues(call.args) });
      }
    }
  }
  if (coords.length > 1) errs.push(`${coords.length} coordinators in one set`);
  let coord = null;
  if (coords.length === 1) {
    const { d, t, c, flags } = coords[0];
    const where = `${t.where} (coordinator)`;
    if (d.spec.replicas !== undefined && d.spec.replicas !== 1) errs.push(`${where}: replicas must be 1`);
    if (!d.spec.strategy || d.spec.strategy.type !== "Recreate") {
      errs.push(`${where}: strategy must be Recreate (never two coordinators at once)`);
    }
    const bind = flags.get("--bind") || "127.0.0.1";
    if (isLoopback(bind)) errs.push(`${where}: --bind ${bind} is not reachable from other pods`);
    const port = Number(flags.get("--port") || 29500);
    const world = Number(flags.get("--world-size") || flags.get("--max-workers"));
    const jobId = flags.get("--job-id") || "default";
    if (!(world >= 1)) errs.push(`${where}: no --world-size`);
    for (const [kind, probe] of [["readinessProbe", c.readinessProbe], ["livenessProbe", c.livenessProbe]]) {
      if (!probe) errs.push(`${where}: no ${kind}`);
      else if (!probe.grpc) {
        errs.push(`${where}: ${kind} must be a grpc probe (the coordinator serves grpc.health.v1)`);
      } else if (probe.grpc.port !== port) {
        errs.push(`${where}: ${kind} checks port ${probe.grpc.port}, the coordinator listens on ${port}`);
      } else if (![undefined, "", "dtrain.v1.Coordinator"].includes(probe.grpc.service)) {
        errs.push(`${where}: ${kind} asks for service ${probe.grpc.service}, which the coordinator does not serve`);
      }
    }
    const svc = services.find((s) => matches(s.spec.selector, t.labels) && s.spec.clusterIP !== "None");
    let svcPort = null;
    if (!svc) errs.push(`${where}: no Service selects the coordinator's pods`);
    else {
      const sp = (svc.spec.ports || []).find(
        (p) => portNumber(c, p.targetPort === undefined ? p.port : p.targetPort) === port,
      );
      if (!sp) errs.push(`Service/${svc.metadata.name}: no port targets the coordinator's port ${port}`);
      else svcPort = sp.port;
    }
    const token = envOf(c).get("DTRAIN_JOB_TOKEN");
    // dtrain refuses a non-loopback bind without a token (coordinator/src/server.cc).
    const tokenRef = token && token.valueFrom && token.valueFrom.secretKeyRef;
    if (!flags.get("--token") && !(token && token.value) && !(tokenRef && !tokenRef.optional)) {
      errs.push(`${where}: --bind ${bind} needs a job token: DTRAIN_JOB_TOKEN from a Secret that is not optional`);
    }
    coord = { where, port, world, jobId, svc, svcPort, token, t, c, stateDir: flags.get("--state-dir") };
    if (coord.stateDir && !claimFor(t.pod, c, coord.stateDir)) {
      errs.push(`${where}: --state-dir ${coord.stateDir} is not on a persistent volume`);
    }
  }

  // The workers: Jobs (or other controllers) whose pods run `dtrain train`.
  for (const o of objs) {
    if (o.kind === "MPIJob") continue;
    for (const t of podTemplates(o)) {
      for (const c of t.pod.containers || []) {
        const call = dtrainCall(c);
        if (!call || call.command !== "train") continue;
        const where = `${t.where} container ${c.name}`;
        const flags = flagValues(call.args);
        const env = envOf(c);
        const val = (n) => (env.get(n) && env.get(n).value !== undefined ? String(env.get(n).value) : undefined);
        const dtrainNames = env.has("DTRAIN_RANK");
        const rankVar = dtrainNames ? "DTRAIN_RANK" : "RANK";
        const sizeVar = dtrainNames ? "DTRAIN_WORLD_SIZE" : "WORLD_SIZE";
        const localVar = dtrainNames ? "DTRAIN_LOCAL_RANK" : "LOCAL_RANK";
        if (!env.has(rankVar)) {
          errs.push(`${where}: sets neither DTRAIN_RANK nor RANK`);
          continue;
        }
        if (o.kind === "Job") {
          if (o.spec.completionMode !== "Indexed") errs.push(`${t.where}: completionMode must be Indexed (rank = completion index)`);
          const ref = ((env.get(rankVar).valueFrom || {}).fieldRef || {}).fieldPath || "";
          if (!/^metadata\.(annotations|labels)\['batch\.kubernetes\.io\/job-completion-index'\]$/.test(ref)) {
            errs.push(`${where}: ${rankVar} must come from the job-completion-index annotation, got '${ref}'`);
          }
        }
        const size = Number(val(sizeVar));
        if (!(size >= 1)) errs.push(`${where}: ${sizeVar} is not a fixed number`);
        if (o.kind === "Job") {
          if (o.spec.completions !== size) errs.push(`${t.where}: completions ${o.spec.completions} != ${sizeVar} ${size}`);
          if (o.spec.parallelism !== size) errs.push(`${t.where}: parallelism ${o.spec.parallelism} != ${sizeVar} ${size} (every rank must run at once)`);
        }
        const local = val(localVar);
        if (dtrainNames ? local !== "0" : !(local === undefined || local === "0")) {
          errs.push(`${where}: ${localVar} must be "0" (one worker per pod; --device cuda is cuda:<local rank>)`);
        }
        if (size > 1) {
          const bind = val("DTRAIN_TCP_BIND");
          if (!bind || isLoopback(bind)) errs.push(`${where}: DTRAIN_TCP_BIND must be a non-loopback address (the ring's default is 127.0.0.1)`);
          const adv = env.get("DTRAIN_TCP_ADVERTISE");
          const advIp = adv && adv.valueFrom && adv.valueFrom.fieldRef && adv.valueFrom.fieldRef.fieldPath === "status.podIP";
          if (!advIp && !(adv && adv.value)) errs.push(`${where}: DTRAIN_TCP_ADVERTISE must give the pod's address (status.podIP)`);
        }
        if (t.pod.subdomain) {
          const hs = services.find((s) => s.metadata.name === t.pod.subdomain);
          if (!hs) errs.push(`${t.where}: no Service named ${t.pod.subdomain} (the pods' subdomain)`);
          else {
            if (hs.spec.clusterIP !== "None") errs.push(`Service/${hs.metadata.name}: must be headless (clusterIP: None)`);
            if (!matches(hs.spec.selector, t.labels)) errs.push(`Service/${hs.metadata.name}: does not select ${t.where}'s pods`);
          }
        }
        const device = String(flags.get("--device") || "cpu");
        if (device.startsWith("cuda") && gpuCount(c, "limits") < 1) {
          errs.push(`${where}: --device ${device} without an nvidia.com/gpu limit`);
        }
        const ckpt = flags.get("--ckpt-dir");
        const wclaim = ckpt ? claimFor(t.pod, c, ckpt) : null;
        if (ckpt && !wclaim) errs.push(`${where}: --ckpt-dir ${ckpt} is not on a persistent volume`);
        if (!coord) {
          errs.push(`${where}: no coordinator in the set`);
          continue;
        }
        if (coord.world !== size) errs.push(`${where}: ${sizeVar} ${size} != coordinator --world-size ${coord.world}`);
        let addr = val("DTRAIN_COORDINATOR");
        if (addr === undefined && val("MASTER_ADDR") !== undefined) addr = `${val("MASTER_ADDR")}:${val("MASTER_PORT")}`;
        if (coord.svc && coord.svcPort) {
          const n = coord.svc.metadata.name;
          const hosts = [n, `${n}.${o.metadata.namespace || ""}`, `${n}.${o.metadata.namespace || ""}.svc`];
          const m = /^(.*):(\d+)$/.exec(addr || "");
          const hostOk = m && (hosts.includes(m[1]) || m[1].startsWith(`${n}.`));
          if (!m || !hostOk || Number(m[2]) !== coord.svcPort) {
            errs.push(`${where}: coordinator address '${addr}' is not Service ${n} port ${coord.svcPort}`);
          }
        }
        if ((val("DTRAIN_JOB_ID") || "default") !== coord.jobId) {
          errs.push(`${where}: DTRAIN_JOB_ID '${val("DTRAIN_JOB_ID")}' != coordinator --job-id '${coord.jobId}'`);
        }
        const wt = JSON.stringify((env.get("DTRAIN_JOB_TOKEN") || {}).valueFrom || null);
        const ct = JSON.stringify((coord.token || {}).valueFrom || null);
        if (wt !== ct) errs.push(`${where}: DTRAIN_JOB_TOKEN is not taken from where the coordinator's is`);
        if (ckpt && wclaim) {
          const cclaim = claimFor(coord.t.pod, coord.c, ckpt);
          if (!cclaim || cclaim.claim !== wclaim.claim || cclaim.mp !== wclaim.mp) {
            errs.push(`${where}: the coordinator commits checkpoints, so it must mount PVC ${wclaim.claim} at ${wclaim.mp} too`);
          }
        }
      }
    }
  }

  // MPIJob: mpirun -np = Worker replicas x slotsPerWorker.
  for (const o of byKind("MPIJob")) {
    const specs = o.spec.mpiReplicaSpecs || {};
    const where = `MPIJob/${o.metadata.name}`;
    if (!specs.Launcher || !specs.Worker) {
      errs.push(`${where}: needs a Launcher and a Worker`);
      continue;
    }
    const slots = o.spec.slotsPerWorker === undefined ? 1 : o.spec.slotsPerWorker;
    const workers = specs.Worker.replicas === undefined ? 1 : specs.Worker.replicas;
    const wt = podTemplates(o).find((x) => x.role === "Worker");
    for (const c of (specs.Launcher.template.spec || {}).containers || []) {
      const call = dtrainCall(c);
      if (!call) continue;
      const np = call.before.indexOf("-np") >= 0 ? call.before[call.before.indexOf("-np") + 1] : undefined;
      if (Number(np) !== workers * slots) {
        errs.push(`${where}: mpirun -np ${np} != Worker replicas ${workers} x slotsPerWorker ${slots}`);
      }
      const flags = flagValues(call.args);
      const device = String(flags.get("--device") || "cpu");
      const wc = wt && (wt.pod.containers || [])[0];
      if (device.startsWith("cuda") && (!wc || gpuCount(wc, "limits") < slots)) {
        errs.push(`${where}: --device ${device} needs nvidia.com/gpu >= slotsPerWorker on the Worker`);
      }
      const ckpt = flags.get("--ckpt-dir");
      if (ckpt && wc && !claimFor(wt.pod, wc, ckpt)) {
        errs.push(`${where}: --ckpt-dir ${ckpt} is not on a persistent volume of the Worker`);
      }
    }
  }
  return errs;
}

// ---------------------------------------------------------------- loading

function loadDocs(text, file) {
  const docs = YAML.parseAllDocuments(text, { prettyErrors: true });
  const out = [];
  for (const d of docs) {
    if (d.errors.length) throw new Error(`${file}: ${d.errors.map((e) => e.message).join("; ")}`);
    const v = d.toJS();
    if (v !== null && v !== undefined) out.push(v);
  }
  return out;
}

function kustomizeRoots(k8sDir) {
  return walk(k8sDir, ["kustomization.yaml"]).map((f) => path.dirname(f)).sort();
}

function manifestFiles(k8sDir) {
  return walk(k8sDir, [".yaml", ".yml"])
    .filter((f) => !/kustomization\.ya?ml$/.test(path.basename(f)))
    .sort();
}

// ---------------------------------------------------------------- main checks

class Tally {
  constructor() {
    this.passed = 0;
    this.failed = 0;
  }
  check(name, errs) {
    if (errs.length === 0) {
      this.passed++;
      console.log(`ok    ${name}`);
    } else {
      this.failed++;
      for (const e of errs) console.log(`FAIL  ${name}: ${e}`);
    }
  }
}

function objectErrors(objs, ctx) {
  const errs = [];
  for (const o of objs) {
    const id = `${o.kind}/${o.metadata && o.metadata.name}`;
    for (const e of schemaErrors(o)) errs.push(`${id}: ${e}`);
    errs.push(...envAndFlagErrors(o, ctx));
  }
  return errs;
}

function render(kubectl, dir) {
  return execFileSync(kubectl, ["kustomize", dir], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, KUBECONFIG: "/dev/null" },
  });
}

function runChecks(o, tally, ctx) {
  const rel = (p) => path.relative(o.k8s, p) || ".";
  for (const f of manifestFiles(o.k8s)) {
    let errs;
    try {
      errs = objectErrors(loadDocs(fs.readFileSync(f, "utf8"), f), ctx);
    } catch (e) {
      errs = [e.message];
    }
    tally.check(`file ${rel(f)}`, errs);
  }
  const rendered = new Map();
  if (!o.kubectl) return rendered;
  for (const dir of kustomizeRoots(o.k8s)) {
    let errs;
    try {
      const objs = loadDocs(render(o.kubectl, dir), `kustomize ${rel(dir)}`);
      rendered.set(rel(dir), objs);
      errs = objectErrors(objs, ctx);
      // storage/ is a piece of the others, not a job of its own.
      if (objs.some((x) => x.kind !== "PersistentVolumeClaim")) errs.push(...wiringErrors(objs));
    } catch (e) {
      errs = [String(e.stderr || e.message).trim()];
    }
    tally.check(`kustomize ${rel(dir)} (${(rendered.get(rel(dir)) || []).length} objects)`, errs);
  }
  return rendered;
}

// ---------------------------------------------------------------- self test

// Each break must be reported with a message matching `expect`.
function selfTest(o, tally, ctx, rendered) {
  const base = rendered.get("base");
  const gpu = rendered.get("overlays/gpu");
  const mpi = rendered.get("mpijob");
  if (!base || !gpu || !mpi) {
    tally.check("self-test", ["needs the rendered base, overlays/gpu and mpijob"]);
    return;
  }
  const find = (objs, kind, name) => objs.find((x) => x.kind === kind && (!name || x.metadata.name === name));
  const worker = (objs) => find(objs, "Job").spec.template.spec.containers[0];
  const coordC = (objs) => find(objs, "Deployment").spec.template.spec.containers[0];
  const setEnv = (c, name, value) => {
    const e = c.env.find((x) => x.name === name);
    if (e) {
      delete e.valueFrom;
      e.value = value;
    } else c.env.push({ name, value });
  };
  const cases = [
    ["schema: replicas as a string", base, (s) => { find(s, "Deployment").spec.replicas = "one"; }, /replicas must be integer/],
    ["schema: a misspelt field", base, (s) => { worker(s).imagePullPolcy = "Always"; }, /imagePullPolcy: unknown field/],
    ["schema: a bad quantity", gpu, (s) => { worker(s).resources.limits["nvidia.com/gpu"] = "one"; }, /quantity/],
    ["schema: a missing container name", base, (s) => { delete coordC(s).name; }, /required property 'name'|must have required property name/],
    ["schema: an unknown kind", base, (s) => { s.push({ apiVersion: "v1", kind: "Nonesuch", metadata: { name: "x" } }); }, /no schema/],
    ["env: a name dtrain does not read", base, (s) => { setEnv(worker(s), "DTRAIN_WORLDSIZE", "2"); }, /DTRAIN_WORLDSIZE is not read by dtrain/],
    ["flags: a flag dtrain train lacks", base, (s) => { worker(s).args.push("--ckpt-evry", "5"); }, /has no flag --ckpt-evry/],
    ["flags: a flag dtrain coordinator lacks", base, (s) => { coordC(s).args.push("--worldsize", "2"); }, /has no flag --worldsize/],
    ["wiring: completions != world size", base, (s) => { find(s, "Job").spec.completions = 3; }, /completions 3 != DTRAIN_WORLD_SIZE 2/],
    ["wiring: coordinator --world-size", base, (s) => { const a = coordC(s).args; a[a.indexOf("--world-size") + 1] = "4"; }, /!= coordinator --world-size 4/],
    ["wiring: coordinator address port", base, (s) => { setEnv(worker(s), "DTRAIN_COORDINATOR", "dtrain-coordinator:29501"); }, /is not Service dtrain-coordinator port/],
    ["wiring: loopback ring bind", base, (s) => { setEnv(worker(s), "DTRAIN_TCP_BIND", "127.0.0.1"); }, /DTRAIN_TCP_BIND must be a non-loopback/],
    ["wiring: rank not from the index", base, (s) => { setEnv(worker(s), "DTRAIN_RANK", "0"); }, /job-completion-index/],
    ["wiring: job id", base, (s) => { setEnv(worker(s), "DTRAIN_JOB_ID", "other"); }, /!= coordinator --job-id/],
    ["wiring: coordinator bound to loopback", base, (s) => { const a = coordC(s).args; a[a.indexOf("--bind") + 1] = "127.0.0.1"; }, /--bind 127.0.0.1 is not reachable/],
    ["wiring: coordinator without a token", base, (s) => { coordC(s).env = []; }, /needs a job token/],
    ["wiring: coordinator token optional", base, (s) => { coordC(s).env[0].valueFrom.secretKeyRef.optional = true; }, /needs a job token/],
    ["wiring: probe on another port", base, (s) => { coordC(s).livenessProbe.grpc.port = 8080; }, /livenessProbe checks port 8080/],
    ["wiring: probe not grpc", base, (s) => { coordC(s).readinessProbe = { tcpSocket: { port: 29500 } }; }, /readinessProbe must be a grpc probe/],
    ["wiring: probe on an unknown service", base, (s) => { coordC(s).livenessProbe.grpc.service = "grpc.health.v1.Health"; }, /does not serve/],
    ["wiring: subdomain without a headless Service", base, (s) => { find(s, "Service", "dtrain-workers").spec.clusterIP = "10.0.0.1"; }, /must be headless/],
    ["wiring: coordinator without the checkpoint volume", base, (s) => { coordC(s).volumeMounts = []; }, /must mount PVC dtrain-shared/],
    ["wiring: --device cuda without a GPU", gpu, (s) => { const c = worker(s); delete c.resources.limits["nvidia.com/gpu"]; delete c.resources.requests["nvidia.com/gpu"]; }, /without an nvidia.com\/gpu limit/],
    ["wiring: mpirun -np", mpi, (s) => { const a = find(s, "MPIJob").spec.mpiReplicaSpecs.Launcher.template.spec.containers[0].args; a[a.indexOf("-np") + 1] = "3"; }, /mpirun -np 3 != Worker replicas 2/],
    ["schema: MPIJob unknown spec field", mpi, (s) => { find(s, "MPIJob").spec.slotPerWorker = 1; }, /must NOT have additional properties/],
    ["schema: MPIJob pod template typo", mpi, (s) => { find(s, "MPIJob").spec.mpiReplicaSpecs.Worker.template.spec.tolerationz = []; }, /tolerationz: unknown field/],
  ];
  for (const [name, objs, breakIt, expect] of cases) {
    const copy = structuredClone(objs);
    breakIt(copy);
    const errs = [...objectErrors(copy, ctx), ...wiringErrors(copy)];
    const hit = errs.some((e) => expect.test(e));
    if (process.env.DTRAIN_K8S_VERBOSE) console.log(`      ${name}: ${errs.join(" | ")}`);
    tally.check(`self-test ${name}`, hit ? [] : [`not reported (got: ${errs.join(" | ") || "no error"})`]);
  }
  // The env set really comes from the sources: a name read nowhere else, added to a
  // copy of one source file, becomes accepted; dropping the reader rejects it.
  const tmp = fs.mkdtempSync(path.join(require("os").tmpdir(), "dtrain-k8s-src-"));
  try {
    fs.mkdirSync(path.join(tmp, "launcher", "src"), { recursive: true });
    fs.writeFileSync(path.join(tmp, "launcher", "src", "x.cc"), 'auto v = std::getenv("DTRAIN_K8S_SELFTEST");\n');
    const names = envNamesFromSources(tmp);
    const ok = names.has("DTRAIN_K8S_SELFTEST") && names.size === 1 && !ctx.envNames.has("DTRAIN_K8S_SELFTEST");
    tally.check("self-test env names are read from the sources", ok ? [] : [`got ${[...names.keys()]}`]);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

function main() {
  const o = parseArgs(process.argv);
  const ctx = { envNames: envNamesFromSources(o.src), commands: flagsFromSources(o.src) };
  if (ctx.envNames.size < 10 || !ctx.commands.has("train") || !ctx.commands.has("coordinator")) {
    console.log(`FAIL  sources: found ${ctx.envNames.size} env names and commands ${[...ctx.commands.keys()]}: the extractors no longer match the sources`);
    process.exit(1);
  }
  console.log(`dtrain reads ${ctx.envNames.size} env names: ${[...ctx.envNames.keys()].sort().join(" ")}`);
  const tally = new Tally();
  const rendered = runChecks(o, tally, ctx);
  if (o.selfTest) selfTest(o, tally, ctx, rendered);
  console.log(`${tally.passed} passed, ${tally.failed} failed`);
  process.exit(tally.failed === 0 ? 0 : 1);
}

main();
