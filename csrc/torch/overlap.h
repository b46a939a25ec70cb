// The process-wide overlap settings of the TP linear ops: how many SMs the GEMMs that run beside a
// collective leave free for it, and how the row-parallel forward sizes its last piece (core::overlap_sm_target). 0, the default, leaves the choice to
// cuBLASLt. A tuning knob for bench/ (tpext.set_overlap_sms); read when an op is enqueued, so a
// CUDA graph keeps the value it was captured with.
#pragma once

namespace tpext::adapter {

int overlap_sms();
// Throws core::InvalidArgument for a negative count; the device's SM count is checked per op.
void set_overlap_sms(int sms);

// Rows of the row-parallel forward's last piece relative to each earlier one
// (core::RowParallelForward::tail_weight): 0, the default, takes the core's measured default.
double row_tail_weight();
// Throws core::InvalidArgument outside [0, 1].
void set_row_tail_weight(double weight);

}  // namespace tpext::adapter
