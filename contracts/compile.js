// Compile with the pinned solc-js: Solidity standard JSON on stdin, standard JSON out on stdout.
// Run from contracts/ so that require() finds node_modules/solc. Driven by host_tools/evm/solc.py.
const solc = require("solc");
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  process.stdout.write(JSON.stringify({ version: solc.version(), output: JSON.parse(solc.compile(input)) }));
});
