//! Activation recomputation ("gradient checkpointing"): a block run through
//! [`Recompute::block`] keeps only its input for the backward pass and runs again there, so
//! training holds one block's intermediates at a time instead of every block's.
//!
//! candle's autograd keeps every intermediate tensor of the forward pass alive until the
//! backward pass (about 70 hidden-size vectors per token and block for BLOOM). A recomputed
//! block is a single custom op in the outer graph: its forward runs the block on an untracked
//! copy of the input and keeps only the output; its backward runs the block again with the
//! input tracked, backpropagates the incoming gradient through that local graph, returns the
//! input's gradient and hands the gradients of the block's own trainable tensors (LoRA factors,
//! or weights in full fine-tuning) to a side channel, which [`Recompute::drain_into`] adds to the
//! outer pass's gradients. The cost is one more forward pass of every block.
//!
//! LoRA dropout draws from one shared RNG; the op saves the RNG's state before the block's
//! forward and replays it in the recomputation, so both passes draw the same masks.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, Var};
use rand::rngs::StdRng;

/// A block's forward pass, `[.., hidden] -> [.., hidden]`.
pub type BlockFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

type SharedRng = Arc<Mutex<Option<StdRng>>>;

/// The side channel of one model's recomputed blocks (cheap to clone; clones share it).
#[derive(Clone, Default)]
pub struct Recompute {
    grads: Arc<Mutex<Vec<(Tensor, Tensor)>>>,
    rng: Option<SharedRng>,
}

impl Recompute {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same, replaying the dropout RNG of `lora` in every recomputation.
    pub fn with_lora(lora: &crate::LoraSet) -> Self {
        Self { grads: Arc::default(), rng: Some(lora.rng.clone()) }
    }

    /// `f(x)`, recomputed in the backward pass. `params` are the trainable tensors `f` uses;
    /// with none (inference, or a frozen block) `f` simply runs.
    pub fn block(&self, x: &Tensor, params: Vec<Tensor>, f: BlockFn) -> Result<Tensor> {
        let Some(first) = params.first().cloned() else { return f(x) };
        let x = x.contiguous()?;
        // The first parameter is the op's second argument only so that the op is tracked even
        // when its input is not (block 0 reads frozen embeddings); its gradient, like every
        // parameter's, goes through the side channel.
        x.apply_op2(&first, BlockOp { f, params, sink: self.clone(), rng_at_forward: Mutex::new(None) })
    }

    /// Adds the gradients collected by the recomputations since the last call into `grads`
    /// (call right after `backward`).
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let collected: Vec<(Tensor, Tensor)> = std::mem::take(&mut *self.grads.lock().expect("recompute lock"));
        for (param, g) in collected {
            let sum = match grads.remove(&param) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.insert(&param, sum);
        }
        Ok(())
    }

    fn rng_state(&self) -> Option<StdRng> {
        self.rng.as_ref().and_then(|r| r.lock().expect("lora rng lock").clone())
    }
}

struct BlockOp {
    f: BlockFn,
    params: Vec<Tensor>,
    sink: Recompute,
    /// The dropout RNG's state when the forward pass ran.
    rng_at_forward: Mutex<Option<StdRng>>,
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "hetfed-recompute"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((a, b))) => d[a..b].to_vec(),
            _ => candle_core::bail!("recompute: expected a contiguous f32 input"),
        };
        let x = Tensor::from_vec(data, l1.shape(), &candle_core::Device::Cpu)?;
        *self.rng_at_forward.lock().expect("recompute lock") = self.sink.rng_state();
        // The local graph (the parameters are tracked) is dropped with `y`: only the output stays.
        let y = (self.f)(&x)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, x: &Tensor, _p: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = match (&self.sink.rng, self.rng_at_forward.lock().expect("recompute lock").clone()) {
            (Some(shared), Some(saved)) => {
                // Replay the forward pass's dropout masks, then put the RNG back where it was.
                let now = shared.lock().expect("lora rng lock").replace(saved);
                let y = (self.f)(xv.as_tensor());
                *shared.lock().expect("lora rng lock") = now;
                y?
            }
            _ => (self.f)(xv.as_tensor())?,
        };
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let mut sink = self.sink.grads.lock().expect("recompute lock");
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                sink.push((p.clone(), g.clone()));
            }
        }
        Ok((grads.get(xv.as_tensor()).cloned().filter(|_| x.track_op()), None))
    }
}
