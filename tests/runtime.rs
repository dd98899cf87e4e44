//! The runtime pieces the op tests do not reach: the recorder's batching keeps launch order
//! across submits, the profiler times every launch and aggregates them per pipeline key,
//! pipeline keys name their variants, and a pipeline that fails to compile in the background is
//! an error where it is recorded.

mod common;

use atelier::gpu::{DType, PipelineKey, Profiler, Recorder, Shader, Tensor};
use atelier::kernels::elementwise::{binary, Binary};
use common::*;

/// 2·BATCH + 45 dependent launches: each adds 1 to the other buffer's value, so the result
/// counts the launches that ran, in order, across several submits.
#[test]
fn recorder_keeps_order_across_batches() {
    let g = gpu();
    let n = 1000;
    let ones = Tensor::from_f32(g, &[n], DType::F32, &vec![1.0; n], "ones").unwrap();
    let x = Tensor::from_f32(g, &[n], DType::F32, &vec![0.0; n], "x").unwrap();
    let y = Tensor::empty(g, &[n], DType::F32, "y").unwrap();
    let to_y = binary(g, Binary::Add { alpha: 1.0 }, &x, &ones, &y).unwrap();
    let to_x = binary(g, Binary::Add { alpha: 1.0 }, &y, &ones, &x).unwrap();
    let launches = 2 * atelier::gpu::recorder::BATCH + 45;
    let mut rec = Recorder::new(g);
    for i in 0..launches {
        rec.run(if i % 2 == 0 { &to_y } else { &to_x }).unwrap();
    }
    rec.finish().unwrap();
    let last = if launches % 2 == 1 { &y } else { &x };
    let v = last.to_f32(g).unwrap();
    assert!(v.iter().all(|&e| e == launches as f32), "got {} after {launches} launches", v[0]);
}

#[test]
fn profiler_counts_every_launch_per_key() {
    let g = gpu();
    let Some(mut prof) = Profiler::new(g) else {
        assert!(!g.caps.timestamps, "timestamps offered but no profiler");
        eprintln!("no timestamp queries on this device");
        return;
    };
    let n = 4096;
    let a = Tensor::from_f32(g, &[n], DType::F16, &random(n, seed("profiler")), "a").unwrap();
    let y = Tensor::empty(g, &[n], DType::F16, "y").unwrap();
    let add = binary(g, Binary::Add { alpha: 1.0 }, &a, &a, &y).unwrap();
    let mul = binary(g, Binary::Mul { alpha: 1.0 }, &a, &a, &y).unwrap();
    {
        let mut rec = Recorder::with_profiler(g, Some(&mut prof));
        for _ in 0..1500 {
            rec.run(&add).unwrap(); // more than one query set's worth: collected mid-way
        }
        for _ in 0..7 {
            rec.run(&mul).unwrap();
        }
        rec.finish().unwrap();
    }
    // add and mul share a pipeline (the op is a uniform): one row, every launch counted.
    let row = prof.stats.get(&*add.label).expect("a row for the binary kernel");
    assert_eq!(row.count, 1507);
    assert!(row.total_ns > 0.0, "no time measured");
    assert!((row.bytes - 1507.0 * add.bytes).abs() < 1.0);
    let table = prof.table();
    assert!(table.contains("elementwise.binary") && table.contains("GB/s"), "{table}");
    println!("{table}");
}

#[test]
fn pipeline_keys_name_their_variants() {
    let k = PipelineKey::new(Shader::MatmulScalar, "main").with("TRANS_A", 1).with("OUT_F32", 0);
    assert_eq!(k.to_string(), "matmul_scalar.main[TRANS_A=1,OUT_F32=0]");
    assert_eq!(PipelineKey::new(Shader::Elementwise, "unary").to_string(), "elementwise.unary");
}

/// Pipelines compile on background threads (see `gpu::pipelines::PipelineSlot`): one the
/// driver refuses (here an override constant the shader lacks) is an error where it is
/// recorded, naming the pipeline, not a panic on a compile thread; a good pipeline queued
/// beside it still runs.
#[test]
fn background_compile_errors_surface_where_recorded() {
    let g = gpu();
    let n = 64;
    let x = Tensor::from_f32(g, &[n], DType::F32, &vec![1.5; n], "x").unwrap();
    let y = Tensor::from_f32(g, &[n], DType::F32, &vec![f32::NAN; n], "y").unwrap();
    let p = atelier::kernels::elementwise::ElementwiseParams { numel: n as u32, b_len: n as u32, alpha: 1.0, ..Default::default() };
    let bad = PipelineKey::new(Shader::Elementwise, "unary").with("IN_F32", 1).with("OUT_F32", 1).with("NO_SUCH_CONSTANT", 3);
    let bad = g.dispatch(&bad, &p, &[&x, &y], [1, 1, 1], 0.0, 0.0).expect("the dispatch is made before its pipeline compiles");
    let good = atelier::kernels::elementwise::unary(g, atelier::kernels::elementwise::Unary::Copy, &x, &y).unwrap();
    let e = g.run_now(&bad).expect_err("a pipeline with an unknown constant must fail").to_string();
    assert!(e.contains("creating pipeline elementwise.unary") && e.contains("NO_SUCH_CONSTANT"), "{e}");
    g.run_now(&good).unwrap();
    assert!(y.to_f32(g).unwrap().iter().all(|&v| v == 1.5));
}
