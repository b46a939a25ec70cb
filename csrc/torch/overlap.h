// The process-wide overlap setting of the TP linear ops: how many SMs the GEMMs that run beside a
// collective leave free for it (core::overlap_sm_target). 0, the default, leaves the choice to
// cuBLASLt. A tuning knob for bench/ (tpext.set_overlap_sms); read when an op is enqueued, so a
// CUDA graph keeps the value it was captured with.
#pragma once

namespace tpext::adapter {

int overlap_sms();
// Throws core::InvalidArgument for a negative count; the device's SM count is checked per op.
void set_overlap_sms(int sms);

}  // namespace tpext::adapter
