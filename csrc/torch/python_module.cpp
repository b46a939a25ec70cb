// tpext._C: the host-side entry points Python needs beside the torch ops (unique ids,
// communicator lifetime, introspection) and the exception types the core can raise.
#include <torch/extension.h>

#include <string>

#include "core/communicator.h"
#include "core/error.h"
#include "core/gemm.h"
#include "core/host_memory.h"
#include "overlap.h"
#include "registry.h"

namespace py = pybind11;
using tpext::adapter::live_handles;
using tpext::adapter::lookup_communicator;
using tpext::adapter::register_communicator;
using tpext::adapter::release_communicator;
namespace core = tpext::core;

namespace {

core::CommOptions make_options(const std::string& name, double timeout_s, int min_ctas, int max_ctas,
                               bool blocking_collectives, int overlap_max_ctas, int64_t window_bytes) {
  if (window_bytes < 0)
    throw core::InvalidArgument("window_bytes: expected >= 0 bytes (0: no symmetric window), got " +
                                std::to_string(window_bytes));
  core::CommOptions o;
  o.window_bytes = static_cast<size_t>(window_bytes);
  o.overlap_max_ctas = overlap_max_ctas;
  o.blocking_collectives = blocking_collectives;
  o.name = name;
  o.timeout_s = timeout_s;
  o.min_ctas = min_ctas;
  o.max_ctas = max_ctas;
  return o;
}

py::dict stats_dict(const core::CommStats& s) {
  py::dict d;
  for (int k = 0; k < core::kNumCollectiveKinds; ++k) {
    py::dict entry;
    entry["calls"] = s.calls[k];
    entry["bytes"] = s.bytes[k];
    d[core::collective_name(static_cast<core::CollectiveKind>(k))] = entry;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tpext native core: NCCL communicators and sharded GEMMs";

  // Order matters: pybind11 tries translators newest first, so the base class goes first.
  static py::exception<core::Error> error(m, "TpextError", PyExc_RuntimeError);
  py::register_exception<core::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  py::register_exception<core::NcclError>(m, "NcclError", error.ptr());
  py::register_exception<core::CudaError>(m, "CudaError", error.ptr());
  py::register_exception<core::Timeout>(m, "CommTimeout", error.ptr());
  py::register_exception<core::Destroyed>(m, "CommDestroyed", error.ptr());

  m.attr("NCCL_BUILD_VERSION") = NCCL_VERSION_CODE;
  m.def("nccl_version", &core::nccl_runtime_version, "NCCL_VERSION_CODE of the libnccl loaded at run time");

  m.def("unique_id", [] {
    core::UniqueId id = core::make_unique_id();
    return py::bytes(id.data(), id.size());
  });

  m.def("set_overlap_sms", &tpext::adapter::set_overlap_sms, py::arg("sms"),
        "SMs the GEMMs that run beside a collective leave free for it (0: cuBLASLt's choice).");
  m.def("overlap_sms", &tpext::adapter::overlap_sms);
  m.def("set_row_tail_weight", &tpext::adapter::set_row_tail_weight, py::arg("weight"),
        "Rows of the row-parallel forward's last piece relative to each earlier one (0: the default).");
  m.def("row_tail_weight", &tpext::adapter::row_tail_weight);
  m.def("set_gemm_autotune", &core::set_matmul_autotune, py::arg("candidates"),
        "Time the heuristic's best `candidates` cuBLASLt algorithms per GEMM problem, keep the fastest (0: off).");
  m.def("gemm_autotune", &core::matmul_autotune);
  m.def("set_gemm_autotune_sustain_ms", &core::set_matmul_autotune_sustain_ms, py::arg("ms"),
        "How autotuning times each candidate: 0 a few short runs, ms > 0 back to back for ms milliseconds.");
  m.def("gemm_autotune_sustain_ms", &core::matmul_autotune_sustain_ms);

  m.def(
      "comm_create",
      [](py::bytes uid, int rank, int size, int device, const std::string& name, double timeout_s, int min_ctas,
         int max_ctas, bool blocking_collectives, int overlap_max_ctas, int64_t window_bytes) {
        std::string raw = uid;
        if (raw.size() != NCCL_UNIQUE_ID_BYTES)
          throw core::InvalidArgument("uid: expected " + std::to_string(NCCL_UNIQUE_ID_BYTES) +
                                      " bytes from tpext._C.unique_id(), got " + std::to_string(raw.size()));
        core::UniqueId id;
        std::copy(raw.begin(), raw.end(), id.begin());
        auto opts =
            make_options(name, timeout_s, min_ctas, max_ctas, blocking_collectives, overlap_max_ctas, window_bytes);
        py::gil_scoped_release no_gil;  // waits for the other ranks
        return register_communicator(core::Communicator::create(id, rank, size, device, opts));
      },
      py::arg("uid"), py::arg("rank"), py::arg("size"), py::arg("device"), py::arg("name") = "world",
      py::arg("timeout_s") = 600.0, py::arg("min_ctas") = -1, py::arg("max_ctas") = -1,
      // Inline launches (see CommOptions::blocking_collectives); False for a fully non-blocking comm.
      py::arg("blocking_collectives") = true,
      // > 0: a second twin capped at this many CTAs carries the collectives tpext overlaps with
      // its own GEMMs (CommOptions::overlap_max_ctas); split children inherit it.
      py::arg("overlap_max_ctas") = -1,
      // > 0: a symmetric NCCL window of that many bytes (CommOptions::window_bytes); split
      // children inherit it.
      py::arg("window_bytes") = 0);

  m.def(
      "comm_split",
      [](int64_t parent, int color, int key, const std::string& name, double timeout_s) -> int64_t {
        auto comm = lookup_communicator(parent, "comm_split");
        core::CommOptions opts = comm->options();
        opts.name = name;
        opts.timeout_s = timeout_s;
        std::unique_ptr<core::Communicator> child;
        {
          py::gil_scoped_release no_gil;
          child = comm->split(color, key, opts);
        }
        return child ? register_communicator(std::move(child)) : -1;
      },
      py::arg("parent"), py::arg("color"), py::arg("key"), py::arg("name"), py::arg("timeout_s") = 600.0);

  m.def(
      "comm_require_no_live_graphs",
      [](int64_t handle, double wait_s) {
        auto comm = lookup_communicator(handle, "comm_require_no_live_graphs");
        py::gil_scoped_release no_gil;  // graph destructors may need the GIL to finish
        comm->require_no_live_graphs(wait_s);
      },
      py::arg("handle"), py::arg("wait_s") = 10.0);

  m.def(
      "comm_destroy",
      [](int64_t handle, double wait_s) {
        std::shared_ptr<core::Communicator> live;
        try {
          live = lookup_communicator(handle, "comm_destroy");
        } catch (const core::InvalidArgument&) {
          return;  // released already: destroy is idempotent
        }
        {
          py::gil_scoped_release no_gil;
          live->require_no_live_graphs(wait_s);  // before the handle goes: a refusal leaves it usable
        }
        live.reset();
        auto comm = release_communicator(handle);
        if (!comm) return;
        py::gil_scoped_release no_gil;
        comm->destroy();
      },
      py::arg("handle"), py::arg("wait_s") = 10.0);

  m.def(
      "comm_abort",
      [](int64_t handle) {
        auto comm = release_communicator(handle);
        if (comm) comm->abort();
      },
      py::arg("handle"));

  m.def(
      "comm_info",
      [](int64_t handle) {
        auto comm = lookup_communicator(handle, "comm_info");
        py::dict d;
        d["rank"] = comm->rank();
        d["size"] = comm->size();
        d["device"] = comm->device();
        d["name"] = comm->name();
        d["alive"] = comm->alive();
        d["blocking_collectives"] = comm->options().blocking_collectives && comm->size() > 1;
        return d;
      },
      py::arg("handle"));

  m.def(
      "comm_window_bytes",
      [](int64_t handle) {
        return static_cast<int64_t>(lookup_communicator(handle, "comm_window_bytes")->window_bytes());
      },
      py::arg("handle"));
  m.def(
      "comm_overlap_max_ctas",
      [](int64_t handle) { return lookup_communicator(handle, "comm_overlap_max_ctas")->overlap_max_ctas(); },
      py::arg("handle"), "CTA cap of the twin that carries overlapped collectives; -1 when there is none");
  m.def("comm_stats", [](int64_t handle) { return stats_dict(lookup_communicator(handle, "comm_stats")->stats()); },
        py::arg("handle"));
  m.def("comm_reset_stats", [](int64_t handle) { lookup_communicator(handle, "comm_reset_stats")->reset_stats(); },
        py::arg("handle"));
  m.def("live_handles", &live_handles);
  m.def("release_freed_host_memory", &core::release_freed_host_memory,
        "malloc_trim: hand freed heap pages back to the OS; returns the RSS bytes released (0 where unknown).");
}
