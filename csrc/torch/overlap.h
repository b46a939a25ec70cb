// The process-wide overlap settings of the TP linear ops: how many SMs the GEMMs that run beside a
// collective leave free for it (core::overlap_sm_target; 0, the default, leaves the choice to
// cuBLASLt), and the size of the row-parallel forward's last piece. Tuning knobs for bench/
// (tpext.set_overlap_sms, tpext.set_row_tail_weight); read when an op is enqueued, so a CUDA graph
// keeps the values it was captured with.
#pragma once

namespace tpext::adapter {

int overlap_sms();
// Throws core::InvalidArgument for a negative count; the device's SM count is checked per op.
void set_overlap_sms(int sms);

// Rows of the row-parallel forward's last piece relative to each earlier one
// (core::RowParallelForward::tail_weight): 0, the default, takes the core's measured default.
double row_tail_weight();
// Throws core::InvalidArgument outside [0, 1] (core::check_tail_weight).
void set_row_tail_weight(double weight);

}  // namespace tpext::adapter
