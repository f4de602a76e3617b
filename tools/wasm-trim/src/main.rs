//! `wasm-trim IN OUT NAME...`: copies a wasm module, leaving out the named exports.
//!
//! The proxy-wasm Rust SDK exports every ABI callback (request body, trailers, log,
//! network filters, ...), and Envoy calls into the VM for each one it finds exported,
//! even when the filter does nothing there. Envoy skips callbacks a module does not
//! export, so removing the ones the filter never implements saves V8 calls on every
//! request. Only exports are removed; the functions stay (and are dead code).

use std::process::ExitCode;

use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser::{Parser, Payload};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: wasm-trim IN OUT [EXPORT...]");
        return ExitCode::from(2);
    }
    let (input, output, drop) = (&args[0], &args[1], &args[2..]);
    match trim(input, output, drop) {
        Ok(dropped) => {
            eprintln!(
                "wasm-trim: {output}: dropped {dropped} of {} named exports",
                drop.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wasm-trim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn trim(input: &str, output: &str, drop: &[String]) -> Result<usize, String> {
    let bytes = std::fs::read(input).map_err(|e| format!("{input}: {e}"))?;
    let mut module = Module::new();
    let mut dropped = 0;
    for payload in Parser::new(0).parse_all(&bytes) {
        let payload = payload.map_err(|e| format!("{input}: {e}"))?;
        match payload {
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader {
                    let export = export.map_err(|e| e.to_string())?;
                    if drop.iter().any(|d| d == export.name) {
                        dropped += 1;
                        continue;
                    }
                    let kind = match export.kind {
                        wasmparser::ExternalKind::Func => ExportKind::Func,
                        wasmparser::ExternalKind::Table => ExportKind::Table,
                        wasmparser::ExternalKind::Memory => ExportKind::Memory,
                        wasmparser::ExternalKind::Global => ExportKind::Global,
                        wasmparser::ExternalKind::Tag => ExportKind::Tag,
                        other => return Err(format!("unsupported export kind {other:?}")),
                    };
                    exports.export(export.name, kind, export.index);
                }
                module.section(&exports);
            }
            Payload::Version { .. } | Payload::End(_) => {}
            // Code and module entries arrive as their section plus per-item payloads;
            // copy whole sections once, by their raw bytes.
            Payload::CodeSectionEntry(_) => {}
            other => {
                if let Some((id, range)) = other.as_section() {
                    module.section(&RawSection {
                        id,
                        data: &bytes[range.start as usize..range.end as usize],
                    });
                }
            }
        }
    }
    std::fs::write(output, module.finish()).map_err(|e| format!("{output}: {e}"))?;
    Ok(dropped)
}
