//! Decoding training images ahead of their first use. While the GPU encodes and trains, a few
//! background threads decode, resize and crop the images the caching epoch needs next, in the
//! order it needs them, so the GPU does not wait on the CPU for each new image (a large JPEG
//! with its Lanczos resize costs tens of milliseconds; the encode and the step about 80).
//!
//! Only for center crops (a random crop is drawn per step, so its image is prepared then) and
//! without a disk cache (whose latents make most decodes unnecessary). At most [`LOOKAHEAD`]
//! prepared images wait at a time. An image's result, pixels or error, is handed over where
//! the trainer asks for it, exactly what [`Dataset::load`] would have returned there.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::Result;
use crate::rng::Rng;
use crate::train::data::{Dataset, Example};

/// Prepared images held at most (3 MB each at 512x512).
pub const LOOKAHEAD: usize = 16;

#[derive(Default)]
struct State {
    /// Images to prepare, in the order of use; those before `next` were handed to a thread.
    queue: Vec<usize>,
    next: usize,
    started: HashSet<usize>,
    done: HashMap<usize, Result<Example>>,
    closing: bool,
}

struct Shared {
    data: Dataset,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A center-cropped image as the trainer loads it (the generator is only drawn from for
    /// random crops).
    fn load(&self, index: usize) -> Result<Example> {
        self.data.load(index, &mut Rng::new(0))
    }
}

/// Background threads preparing images ahead of the trainer (see the module notes).
pub struct Prefetcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// Up to 4 threads (one less than the CPU's cores); None when none can start.
    pub fn new(data: &Dataset) -> Option<Prefetcher> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).clamp(1, 4);
        let shared = Arc::new(Shared { data: data.clone(), state: Mutex::new(State::default()), changed: Condvar::new() });
        let mut threads = Vec::new();
        for i in 0..n {
            let s = shared.clone();
            match std::thread::Builder::new().name(format!("atelier-images-{i}")).spawn(move || worker(&s)) {
                Ok(t) => threads.push(t),
                Err(_) => break,
            }
        }
        (!threads.is_empty()).then_some(Prefetcher { shared, threads })
    }

    /// Queues `indices` (in the order they will be used) behind what is queued; ones already
    /// queued, in progress or waiting are skipped.
    pub fn schedule(&self, indices: impl IntoIterator<Item = usize>) {
        let mut s = self.shared.lock();
        let mut known: HashSet<usize> = s.queue[s.next..].iter().copied().chain(s.started.iter().copied()).chain(s.done.keys().copied()).collect();
        for i in indices {
            if known.insert(i) {
                s.queue.push(i);
            }
        }
        drop(s);
        self.shared.changed.notify_all();
    }

    /// Image `index`, center-cropped: prepared ahead, being prepared (then this waits), or
    /// loaded now on this thread (taken off the queue when it was still waiting there).
    pub fn take(&self, index: usize) -> Result<Example> {
        let mut s = self.shared.lock();
        loop {
            if let Some(r) = s.done.remove(&index) {
                drop(s);
                self.shared.changed.notify_all();
                return r;
            }
            if !s.started.contains(&index) {
                break;
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let next = s.next;
        if let Some(p) = s.queue[next..].iter().position(|&i| i == index) {
            s.queue.remove(next + p);
        }
        drop(s);
        self.shared.load(index)
    }
}

fn worker(s: &Shared) {
    loop {
        let index = {
            let mut st = s.lock();
            loop {
                if st.closing {
                    return;
                }
                if st.next < st.queue.len() && st.started.len() + st.done.len() < LOOKAHEAD {
                    let i = st.queue[st.next];
                    st.next += 1;
                    st.started.insert(i);
                    break i;
                }
                st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let r = s.load(index);
        let mut st = s.lock();
        st.started.remove(&index);
        st.done.insert(index, r);
        drop(st);
        s.changed.notify_all();
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
