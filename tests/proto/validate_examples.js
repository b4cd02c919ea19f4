#!/usr/bin/env node
// Validates proto/examples against proto/usage_event.schema.json with ajv, Debian 12's node-ajv
// (ajv 6, JSON Schema draft-07).
//
//   node tests/proto/validate_examples.js              every example, as validate_examples.py
//   node tests/proto/validate_examples.js EVENT.json…  those files, one line per error
//
// Without files it checks every example against tests/proto/example_reasons.json twice: with
// format assertion (format: 'full', which also checks the calendar: no 2026-02-30) and without
// (format: false, where only 'schema-format' examples may pass). One line per failure, then a
// closing count; exit 1 on any failure. A missing node-ajv is a failure, never a skip.
'use strict';

const fs = require('fs');
const path = require('path');
const childProcess = require('child_process');

// Debian installs node-* packages under /usr/share/nodejs. Debian's own nodejs searches there;
// other builds of Node (NodeSource's, say) need NODE_PATH for ajv's own require()s, so set it
// and run again.
const DEBIAN_NODE_MODULES = '/usr/share/nodejs';
const nodePath = (process.env.NODE_PATH || '').split(path.delimiter).filter(Boolean);
if (!nodePath.includes(DEBIAN_NODE_MODULES)) {
  const env = {...process.env, NODE_PATH: [DEBIAN_NODE_MODULES, ...nodePath].join(path.delimiter)};
  const run = childProcess.spawnSync(process.execPath, process.argv.slice(1),
                                     {env, stdio: 'inherit'});
  process.exit(run.status === null ? 1 : run.status);
}

const ROOT = path.resolve(__dirname, '..', '..');
const SCHEMA = path.join(ROOT, 'proto', 'usage_event.schema.json');
const EXAMPLES = path.join(ROOT, 'proto', 'examples');
const REASONS = path.join(__dirname, 'example_reasons.json');
const CLASSES = new Set(['unparseable', 'schema', 'schema-format', 'server']);

let Ajv;
let ajvVersion;
try {
  // Debian's package by its path, not whichever ajv a node_modules folder might hold.
  Ajv = require(path.join(DEBIAN_NODE_MODULES, 'ajv'));
  ajvVersion = require(path.join(DEBIAN_NODE_MODULES, 'ajv', 'package.json')).version;
} catch (e) {
  console.log(`FAIL ajv: cannot load (${e.message.split('\n')[0]}); install Debian's node-ajv ` +
              '(deploy/install-deps.sh)');
  console.log('ajv: 0 passed, 1 failed');
  process.exit(1);
}

function compile(assertFormat) {
  // ajv 6 knows draft-07 by default and checks the schema against its meta-schema.
  const ajv = new Ajv({allErrors: true, format: assertFormat ? 'full' : false});
  return ajv.compile(JSON.parse(fs.readFileSync(SCHEMA, 'utf8')));
}

class Unparseable extends Error {}

function loadJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Unparseable(e.message);
  }
}

function errorsOf(validate, instance) {
  if (validate(instance)) return [];
  // The root is a oneOf (event or batch): drop its own error and the other branch's "should be
  // object/array" when there is something more specific to say.
  const rootNoise = (e) => e.dataPath === '' && (e.keyword === 'oneOf' || e.keyword === 'type');
  const specific = validate.errors.filter((e) => !rootNoise(e));
  return (specific.length ? specific : validate.errors)
      .map((e) => `${e.dataPath || '(root)'}: ${e.message}`);
}

function listJson(dir) {
  return fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
}

function expectedExamples(failures) {
  const {reasons, files} = JSON.parse(fs.readFileSync(REASONS, 'utf8'));
  for (const [name, cls] of [...Object.entries(reasons), ...Object.entries(files)]) {
    if (!CLASSES.has(cls)) failures.push(`example_reasons.json: ${name}: unknown class ${cls}`);
  }
  for (const rel of Object.keys(files)) {
    if (!fs.existsSync(path.join(EXAMPLES, 'invalid', rel))) {
      failures.push(`example_reasons.json: files: no example invalid/${rel}`);
    }
  }
  const out = [];
  const valid = listJson(path.join(EXAMPLES, 'valid'));
  if (valid.length === 0) failures.push('no valid examples found');
  for (const f of valid) out.push([path.join('valid', f), 'valid']);
  const seen = new Set();
  const reasonDirs = fs.readdirSync(path.join(EXAMPLES, 'invalid'), {withFileTypes: true})
                         .filter((d) => d.isDirectory()).map((d) => d.name).sort();
  for (const reason of reasonDirs) {
    seen.add(reason);
    if (!(reason in reasons)) {
      failures.push(`invalid/${reason}/: reason missing from tests/proto/example_reasons.json ` +
                    '(decide whether the schema rejects it)');
      continue;
    }
    for (const f of listJson(path.join(EXAMPLES, 'invalid', reason))) {
      out.push([path.join('invalid', reason, f), files[`${reason}/${f}`] || reasons[reason]]);
    }
  }
  for (const reason of Object.keys(reasons).sort()) {
    if (!seen.has(reason)) failures.push(`example_reasons.json: no directory invalid/${reason}/`);
  }
  return out;
}

function runExamples() {
  const failures = [];
  let checks = 0;
  let failedChecks = 0;
  const examples = expectedExamples(failures);
  for (const assertFormat of [true, false]) {
    let validate;
    try {
      validate = compile(assertFormat);
    } catch (e) {
      failures.push(`ajv: refuses the schema: ${e.message}`);
      continue;
    }
    console.log(`# ajv ${ajvVersion} (draft-07), ` +
                (assertFormat ? "format asserted (format: 'full')" : 'format not asserted'));
    for (const [rel, cls] of examples) {
      checks++;
      const expect = cls === 'unparseable' ? 'unparseable'
          : cls === 'schema' || (cls === 'schema-format' && assertFormat) ? 'reject' : 'accept';
      let errors;
      let got;
      try {
        errors = errorsOf(validate, loadJson(path.join(EXAMPLES, rel)));
        got = errors.length ? 'reject' : 'accept';
      } catch (e) {
        errors = [e.message];
        got = e instanceof Unparseable ? 'unparseable' : 'error';
      }
      if (got !== expect) {
        failedChecks++;
        failures.push(`ajv: ${rel} (${cls}): expected ${expect}, got ${got}` +
                      (errors.length ? `: ${errors[0]}` : ''));
      }
    }
  }
  for (const line of failures) console.log(`FAIL ${line}`);
  console.log(`ajv: ${checks - failedChecks} passed, ${failures.length} failed`);
  return failures.length ? 1 : 0;
}

function runFiles(files) {
  const validate = compile(true);
  let status = 0;
  for (const file of files) {
    let errors;
    try {
      errors = errorsOf(validate, loadJson(file));
    } catch (e) {
      errors = [`not JSON: ${e.message}`];
    }
    for (const err of errors) console.log(`${file}: ${err}`);
    if (errors.length) status = 1;
    else console.log(`${file}: valid`);
  }
  return status;
}

const files = process.argv.slice(2);
process.exit(files.length ? runFiles(files) : runExamples());
