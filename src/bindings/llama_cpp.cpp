// llama_cpp._core: the native core of llama-cpp-nanobind.
//
// One file, in sections: errors, logging, backend, model, sampling, chat, text, decoding,
// MoE expert profiler, context, generation, engine, fit. Each section ends in a bind_* function; NB_MODULE only calls them.
//
// Threading rules (see ../../docs/ARCHITECTURE.md, "Threads, the GIL and ownership"):
//   * every call that can take more than about a millisecond releases the GIL; arguments
//     are converted before the release and no Python object is touched inside;
//   * a context has one owner at a time, a call or a stream (ContextState::acquire), and
//     owners wait for it with the GIL released; ContextState::mutex only guards who the
//     owner is and is never held while decoding, freeing or taking the GIL;
//   * the GIL is taken back only by llama.cpp's log callback (to hand a finished line to
//     Python) and by the per-token Python hooks.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <chat.h>                    // llama.cpp's common library: chat templates, parsers
#include <fit.h>                     // fitting a model to free device memory
#include <json-schema-to-grammar.h>  // and JSON schema to GBNF

#include <ggml-backend.h>
#include <ggml.h>
#include <gguf.h>
#include <llama.h>
// llama.cpp's grammar parser, an internal header that scripts/setup_llama.py copies (llama.cpp's
// own tests use it too): the only way to the reason a grammar is rejected, which the public API
// prints to stderr. A prebuilt llama.cpp of one's own may lack it: errors then say less.
#if __has_include(<llama-internal/llama-grammar.h>)
#include <llama-internal/llama-grammar.h>
#define LLAMA_CPP_GRAMMAR_PARSER 1
#endif
// llama.cpp's staging API (exported by libllama, copied by scripts/setup_llama.py as well):
// llama_get_memory_breakdown, llama.cpp's own per-buffer-type accounting of a context.
#include <llama-internal/llama-ext.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <optional>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cerrno>
#ifdef __GLIBC__
#include <dlfcn.h>
#include <malloc.h>
#endif
#include <cstring>
#include <deque>
#include <filesystem>
#include <iterator>
#include <limits>
#include <memory>
#include <map>
#include <numeric>
#include <random>
#include <mutex>
#include <regex>
#include <stdexcept>
#include <string>
#include <set>
#include <string_view>
#include <unordered_map>
#include <thread>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

namespace nb = nanobind;
using namespace nb::literals;

#ifndef LLAMA_CPP_COMMIT
#define LLAMA_CPP_COMMIT "unknown"
#endif

namespace {

// =====================================================================================
// Errors
// =====================================================================================
//
// C++ exceptions thrown anywhere below are translated at the boundary into a small Python
// hierarchy rooted at LlamaError (a RuntimeError). Errors that a caller provokes with a bad
// argument also derive from ValueError, so code written for llama-cpp-python (which raises
// ValueError) keeps working.

struct LlamaError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
struct ModelLoadError : LlamaError {
    using LlamaError::LlamaError;
};
struct ContextOverflowError : LlamaError {
    using LlamaError::LlamaError;
};
struct DecodeError : LlamaError {
    using LlamaError::LlamaError;
};
struct ClosedError : LlamaError {
    using LlamaError::LlamaError;
};
struct InvalidArgumentError : LlamaError {
    using LlamaError::LlamaError;
};
struct CancelledError : LlamaError {
    using LlamaError::LlamaError;
};
struct GrammarError : InvalidArgumentError {
    using InvalidArgumentError::InvalidArgumentError;
};

PyObject *py_llama_error = nullptr;
PyObject *py_model_load_error = nullptr;
PyObject *py_context_overflow_error = nullptr;
PyObject *py_decode_error = nullptr;
PyObject *py_closed_error = nullptr;
PyObject *py_invalid_argument_error = nullptr;
PyObject *py_cancelled_error = nullptr;
PyObject *py_grammar_error = nullptr;

PyObject *new_exception(nb::module_ &m, const char *name, PyObject *bases, const char *doc) {
    std::string qualified = std::string("llama_cpp._core.") + name;
    PyObject *type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
    if (type == nullptr) {
        throw nb::python_error();
    }
    m.attr(name) = nb::handle(type);
    return type;
}

// Raises `type` with the message `what`. Messages may quote bytes from files and input (a
// damaged state's architecture name, a grammar cut mid-character): they are decoded with
// U+FFFD for invalid UTF-8, where PyErr_SetString would raise UnicodeDecodeError instead.
void set_error(PyObject *type, const char *what) {
    PyObject *message = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
    if (message == nullptr) {
        return;  // MemoryError is set
    }
    PyErr_SetObject(type, message);
    Py_DECREF(message);
}

void bind_errors(nb::module_ &m) {
    py_llama_error = new_exception(m, "LlamaError", PyExc_RuntimeError,
                                   "Base class of every error raised by llama_cpp.");
    nb::object load_bases = nb::make_tuple(nb::handle(py_llama_error), nb::handle(PyExc_ValueError));
    py_model_load_error = new_exception(
        m, "ModelLoadError", load_bases.ptr(),
        "A GGUF file is missing, unreadable, truncated or not a model llama.cpp can load.");
    py_context_overflow_error = new_exception(
        m, "ContextOverflowError", load_bases.ptr(),
        "The tokens to evaluate do not fit in the context window.");
    py_decode_error = new_exception(m, "DecodeError", py_llama_error,
                                    "llama_decode failed (out of memory or an internal error).");
    py_closed_error = new_exception(
        m, "ClosedError", py_llama_error,
        "The model or context was closed (possibly while a call on it was running).");
    py_invalid_argument_error = new_exception(m, "InvalidArgumentError", load_bases.ptr(),
                                              "An argument is out of its valid range.");
    py_grammar_error = new_exception(m, "GrammarError", py_invalid_argument_error,
                                     "A GBNF grammar (or a schema turned into one) is invalid.");
    py_cancelled_error = new_exception(m, "GenerationCancelled", py_llama_error,
                                       "The generation was cancelled (Cancellation.cancel()).");

    // PyErr_SetString decodes the message strictly: one quoting bytes of a hostile file (a
    // tokenizer name, a token) that are not UTF-8 would raise UnicodeDecodeError instead.
    static constexpr auto set_error = [](PyObject *type, const char *what) {
        PyObject *message =
            PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "backslashreplace");
        if (message == nullptr) {
            return;  // the decoding error (a MemoryError) is pending
        }
        PyErr_SetObject(type, message);
        Py_DECREF(message);
    };
    nb::register_exception_translator([](const std::exception_ptr &p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const ModelLoadError &e) {
            set_error(py_model_load_error, e.what());
        } catch (const ContextOverflowError &e) {
            set_error(py_context_overflow_error, e.what());
        } catch (const DecodeError &e) {
            set_error(py_decode_error, e.what());
        } catch (const ClosedError &e) {
            set_error(py_closed_error, e.what());
        } catch (const GrammarError &e) {
            set_error(py_grammar_error, e.what());
        } catch (const InvalidArgumentError &e) {
            set_error(py_invalid_argument_error, e.what());
        } catch (const CancelledError &e) {
            set_error(py_cancelled_error, e.what());
        } catch (const LlamaError &e) {
            set_error(py_llama_error, e.what());
        }
    });
}

// =====================================================================================
// Logging
// =====================================================================================
//
// llama.cpp and ggml log through one process-wide callback. Lines are assembled per thread
// (llama.cpp emits pieces with GGML_LOG_LEVEL_CONT) and handed, whole, to a Python callable
// installed by llama_cpp._logging. Lines below the current threshold are dropped without
// taking the GIL. The last error lines of the calling thread are kept so that a failed load
// can say why it failed.

struct LogState {
    std::mutex mutex;                       // guards callback
    PyObject *callback = nullptr;           // owned reference, or nullptr
    // Whether callback is set, readable without the GIL or the mutex: a line nobody listens
    // to must not wait for the GIL (a thread holding it may be waiting for this one).
    std::atomic<bool> has_callback{false};
    std::atomic<int> min_level{GGML_LOG_LEVEL_WARN};
};

LogState &log_state() {
    static LogState *state = new LogState();  // never destroyed: may be used during exit
    return *state;
}

thread_local std::string tl_log_line;
thread_local int tl_log_level = GGML_LOG_LEVEL_INFO;
thread_local std::string tl_last_errors;
thread_local bool tl_quiet = false;  // verbose=False: only errors, for this thread's current call

// Drops this thread's non-error log lines for its lifetime (llama-cpp-python's verbose=False,
// without touching the process-wide threshold that other threads rely on).
class QuietScope {
  public:
    explicit QuietScope(bool quiet) : previous_(tl_quiet) { tl_quiet = quiet; }
    ~QuietScope() { tl_quiet = previous_; }
    QuietScope(const QuietScope &) = delete;
    QuietScope &operator=(const QuietScope &) = delete;

  private:
    bool previous_;
};

bool python_is_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing() != 0;
#else
    return _Py_IsFinalizing() != 0;
#endif
}

// The error lines llama.cpp logged on this thread since they were last cleared, or `fallback`.
std::string last_errors_or(const char *fallback) {
    return tl_last_errors.empty() ? std::string(fallback) : tl_last_errors;
}

void emit_log_line(int level, const std::string &line) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        if (!tl_last_errors.empty()) {
            tl_last_errors += "; ";
        }
        tl_last_errors += line;
        if (tl_last_errors.size() > 4096) {
            tl_last_errors.erase(0, tl_last_errors.size() - 4096);
        }
    }
    if (level < log_state().min_level.load(std::memory_order_relaxed) || (tl_quiet && level < GGML_LOG_LEVEL_ERROR)) {
        return;
    }
    if (!log_state().has_callback.load(std::memory_order_acquire) || !Py_IsInitialized() ||
        python_is_finalizing()) {
        return;
    }
    nb::gil_scoped_acquire gil;
    PyObject *callback = nullptr;
    {
        std::lock_guard<std::mutex> lock(log_state().mutex);
        callback = log_state().callback;
        Py_XINCREF(callback);
    }
    if (callback == nullptr) {
        return;
    }
    PyObject *text = PyUnicode_DecodeUTF8(line.data(), static_cast<Py_ssize_t>(line.size()), "replace");
    PyObject *result = text ? PyObject_CallFunction(callback, "iO", level, text) : nullptr;
    if (result == nullptr) {
        PyErr_WriteUnraisable(callback);  // a broken handler must not break decoding
    }
    Py_XDECREF(result);
    Py_XDECREF(text);
    Py_DECREF(callback);
}

void log_callback(ggml_log_level level, const char *text, void * /*user_data*/) {
    if (level != GGML_LOG_LEVEL_CONT) {
        if (!tl_log_line.empty()) {
            emit_log_line(tl_log_level, tl_log_line);
            tl_log_line.clear();
        }
        tl_log_level = level;
    }
    tl_log_line += text;
    size_t newline;
    while ((newline = tl_log_line.find('\n')) != std::string::npos) {
        std::string line = tl_log_line.substr(0, newline);
        tl_log_line.erase(0, newline + 1);
        if (!line.empty()) {
            emit_log_line(tl_log_level, line);
        }
    }
}

void set_log_callback(nb::object callback) {
    PyObject *old = nullptr;
    {
        std::lock_guard<std::mutex> lock(log_state().mutex);
        old = log_state().callback;
        log_state().callback = callback.is_none() ? nullptr : callback.inc_ref().ptr();
        log_state().has_callback.store(log_state().callback != nullptr, std::memory_order_release);
    }
    Py_XDECREF(old);
}

// ggml aborts the process on errors it cannot return (an RPC worker that vanished
// mid-decode: "Remote RPC server crashed or returned malformed response"). Nothing can stop
// the abort() that follows this callback; the message at least reaches Python logging (as
// an error line of the llama_cpp logger, whose handlers flush per record) instead of bare
// stderr, and stdio is flushed. Without a Python callback it is printed to stderr as ggml does.
// Exported by libggml-base without a public declaration; what ggml's own abort prints.
extern "C" void ggml_print_backtrace(void);

// ggml's abort callback: the message to the llama_cpp logger, then the backtrace ggml prints
// when no callback is set (replacing its handler must not lose it), then ggml aborts.
void abort_to_log(const char *message) {
    const std::string line = std::string("ggml_abort: ") + message + " (the process aborts now)";
    if (log_state().has_callback.load(std::memory_order_acquire) && Py_IsInitialized() && !python_is_finalizing()) {
        emit_log_line(GGML_LOG_LEVEL_ERROR, line);
    } else {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(nullptr);
    ggml_print_backtrace();
}

void bind_logging(nb::module_ &m) {
    llama_log_set(log_callback, nullptr);
    ggml_set_abort_callback(abort_to_log);
    m.def("set_log_callback", &set_log_callback, "callback"_a.none(),
          "Install ``callback(level: int, line: str)`` for llama.cpp's log (None removes it).");
    m.def(
        "set_log_level", [](int level) { log_state().min_level.store(level); }, "level"_a,
        "Drop llama.cpp log lines below ``level`` (a GGML_LOG_LEVEL value) without taking the "
        "GIL.");
    m.attr("LOG_LEVEL_DEBUG") = static_cast<int>(GGML_LOG_LEVEL_DEBUG);
    m.attr("LOG_LEVEL_INFO") = static_cast<int>(GGML_LOG_LEVEL_INFO);
    m.attr("LOG_LEVEL_WARN") = static_cast<int>(GGML_LOG_LEVEL_WARN);
    m.attr("LOG_LEVEL_ERROR") = static_cast<int>(GGML_LOG_LEVEL_ERROR);
}

// =====================================================================================
// Backend
// =====================================================================================

struct Device {
    std::string name;
    std::string description;
    std::string type;
    size_t memory_free = 0;
    size_t memory_total = 0;
    bool available = true;  // false: an RPC server that does not answer now
};

std::once_flag backend_once;
// Backend modules of the package's lib dir that did not load (file name, why), found once
// by backend_init and read afterwards only.
std::vector<std::pair<std::string, std::string>> backend_failures;

// Why the backend modules (libggml-<name>[-<variant>].so) in `dir` whose backend is not
// registered did not load. ggml_backend_load_all_from_path is silent in a release build: a
// CUDA module without a driver or without the nvidia packages would vanish without a word.
// Each such module is opened again here only to read dlerror(); nothing is registered.
std::vector<std::pair<std::string, std::string>> probe_backend_modules(const std::string &dir) {
    namespace fs = std::filesystem;
    std::vector<std::pair<std::string, std::string>> failures;
    std::error_code ec;
    std::vector<fs::path> modules;
    for (const auto &entry : fs::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind("libggml-", 0) == 0 && entry.path().extension() == ".so" &&
            name.rfind("libggml-base", 0) != 0 && entry.is_regular_file(ec)) {
            modules.push_back(entry.path());
        }
    }
    std::sort(modules.begin(), modules.end());
    for (const auto &path : modules) {
        const std::string file = path.filename().string();
        std::string backend = file.substr(8, file.size() - 8 - 3);  // libggml-<backend>.so
        backend = backend.substr(0, backend.find('-'));              // cpu-haswell -> cpu
        if (ggml_backend_reg_by_name(backend.c_str()) != nullptr) {
            continue;  // loaded (for the CPU: its best variant)
        }
        std::string reason;
        void *handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (handle == nullptr) {
            const char *error = dlerror();
            reason = error ? error : "dlopen failed";
        } else {
            using score_fn = int (*)();
            auto score = reinterpret_cast<score_fn>(dlsym(handle, "ggml_backend_score"));
            if (dlsym(handle, "ggml_backend_init") == nullptr) {
                reason = "not a ggml backend module (no ggml_backend_init)";
            } else if (score != nullptr && score() == 0) {
                reason = "not supported on this system";
            } else {
                reason = "its backend did not initialise (no device, or an incompatible ggml)";
            }
            dlclose(handle);
        }
        failures.emplace_back(file, std::move(reason));
    }
    return failures;
}

void backend_init(const std::string &backend_dir) {
    // Backends built as loadable modules (GGML_BACKEND_DL, the portable and CUDA builds) live
    // next to libggml: llama_backend_init() would look for them next to the Python executable.
    // A regular build links its backends in and loads nothing here.
    std::call_once(backend_once, [&] {
        if (!backend_dir.empty()) {
            ggml_backend_load_all_from_path(backend_dir.c_str());
            backend_failures = probe_backend_modules(backend_dir);
        }
        llama_backend_init();
    });
}


// -- RPC: llama.cpp's RPC backend puts layers on ggml-rpc-server processes, here or on other
// machines. A server's devices are registered once per process (llama.cpp keeps them);
// which ones a model uses is chosen per model (see ModelParams::offload_devices).

std::mutex rpc_mutex;
std::vector<std::string> rpc_endpoints;  // registered, in order

// Whether a TCP connection to host:port succeeds within `timeout_ms`. llama.cpp's RPC client
// aborts the process when it cannot connect, so every endpoint is probed first.
bool tcp_reachable(const std::string &host, const std::string &port, int timeout_ms) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo *found = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return false;
    std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> addresses(found, &freeaddrinfo);
    for (addrinfo *a = found; a != nullptr; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
        bool ok = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
        if (!ok && errno == EINPROGRESS) {
            pollfd p{fd, POLLOUT, 0};
            int err = 0;
            socklen_t len = sizeof(err);
            ok = ::poll(&p, 1, timeout_ms) == 1 && ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
        }
        ::close(fd);
        if (ok) return true;
    }
    return false;
}

// Whether the worker at "host:port" ("[::1]:port" for IPv6) accepts a TCP connection.
bool rpc_endpoint_reachable(const std::string &endpoint, int timeout_ms) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0) return false;
    std::string host = endpoint.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return tcp_reachable(host, endpoint.substr(colon + 1), timeout_ms);
}

void rpc_register(const std::vector<std::string> &endpoints) {
    std::lock_guard<std::mutex> lock(rpc_mutex);
    for (const auto &endpoint : endpoints) {
        const size_t colon = endpoint.rfind(':');
        if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size() ||
            endpoint.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
            throw InvalidArgumentError("an RPC server is 'host:port', got '" + endpoint + "'");
        }
        if (std::find(rpc_endpoints.begin(), rpc_endpoints.end(), endpoint) != rpc_endpoints.end()) {
            continue;
        }
        if (!rpc_endpoint_reachable(endpoint, 5000)) {
            throw LlamaError("cannot reach the RPC server at " + endpoint + " (is ggml-rpc-server running there?)");
        }
        ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
        if (rpc == nullptr) {
            throw LlamaError("this build of llama.cpp has no RPC backend (GGML_RPC=OFF)");
        }
        using add_server_t = ggml_backend_reg_t (*)(const char *);
        auto add_server = reinterpret_cast<add_server_t>(ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server"));
        if (add_server == nullptr) {
            throw LlamaError("the RPC backend does not export ggml_backend_rpc_add_server");
        }
        ggml_backend_reg_t reg = add_server(endpoint.c_str());
        if (reg == nullptr) {
            throw LlamaError("cannot reach the RPC server at " + endpoint + " (is ggml-rpc-server running there?)");
        }
        ggml_backend_register(reg);
        rpc_endpoints.push_back(endpoint);
    }
}

// -- NUMA: llama.cpp (ggml) sets its NUMA strategy once per process and ignores later calls;
// a second, different strategy is refused rather than silently dropped.

std::mutex numa_mutex;
std::string numa_chosen;  // "" until numa_init ran

void numa_init(const std::string &strategy) {
    static const std::map<std::string, ggml_numa_strategy> strategies = {
        {"distribute", GGML_NUMA_STRATEGY_DISTRIBUTE},
        {"isolate", GGML_NUMA_STRATEGY_ISOLATE},
        {"numactl", GGML_NUMA_STRATEGY_NUMACTL},
    };
    const auto found = strategies.find(strategy);
    if (found == strategies.end()) {
        throw InvalidArgumentError("numa must be 'distribute', 'isolate' or 'numactl', got '" + strategy + "'");
    }
    std::lock_guard<std::mutex> lock(numa_mutex);
    if (numa_chosen.empty()) {
        llama_numa_init(found->second);
        numa_chosen = strategy;
    } else if (numa_chosen != strategy) {
        throw InvalidArgumentError("the NUMA strategy is set once per process: it is '" + numa_chosen +
                                   "', so numa='" + strategy + "' cannot take effect");
    }
}

std::optional<std::string> numa_strategy() {
    std::lock_guard<std::mutex> lock(numa_mutex);
    if (numa_chosen.empty()) return std::nullopt;
    return numa_chosen;
}

bool is_rpc_device(ggml_backend_dev_t dev) {
    const std::string reg = ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev));
    return reg.rfind("RPC", 0) == 0;
}

std::vector<Device> list_devices() {
    std::vector<Device> devices;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        Device d;
        d.name = ggml_backend_dev_name(dev);
        d.description = ggml_backend_dev_description(dev);
        switch (ggml_backend_dev_type(dev)) {
        case GGML_BACKEND_DEVICE_TYPE_CPU: d.type = "cpu"; break;
        case GGML_BACKEND_DEVICE_TYPE_GPU: d.type = "gpu"; break;
        case GGML_BACKEND_DEVICE_TYPE_IGPU: d.type = "igpu"; break;
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: d.type = "accel"; break;
        default: d.type = "other"; break;
        }
        // Asking a registered RPC server that has since gone away for its memory would abort
        // the process (llama.cpp's RPC client aborts on a failed call): probe it first.
        if (is_rpc_device(dev)) d.available = rpc_endpoint_reachable(d.description, 1000);
        if (d.available) ggml_backend_dev_memory(dev, &d.memory_free, &d.memory_total);
        devices.push_back(std::move(d));
    }
    return devices;
}

void bind_backend(nb::module_ &m) {
    m.def("backend_init", &backend_init, "backend_dir"_a,
          "Load backend modules from ``backend_dir`` (portable builds) and initialise llama.cpp. "
          "Called once by the package on import; later calls do nothing.");
    m.def("backend_load_errors", [] { return backend_failures; },
          "The backend modules backend_init found but could not load: (file name, reason).");
    m.def("probe_backend_modules", &probe_backend_modules, "directory"_a,
          "Why the backend modules in ``directory`` whose backend is not registered fail to "
          "load: (file name, reason) pairs. Registers nothing.");
    m.def("system_info", [] { return std::string(llama_print_system_info()); },
          "llama.cpp's system line: backends and the CPU features they were built with.");
    m.def("supports_gpu_offload", &llama_supports_gpu_offload);
    m.def("supports_mmap", &llama_supports_mmap);
    m.def("supports_mlock", &llama_supports_mlock);
    m.def("supports_rpc", &llama_supports_rpc);
    m.def("max_devices", [] { return static_cast<int64_t>(llama_max_devices()); });
    m.def("llama_cpp_commit", [] { return std::string(LLAMA_CPP_COMMIT); },
          "The llama.cpp commit the module was compiled against ('unknown' for a user's build).");

    nb::class_<Device>(m, "Device", "A compute device that ggml can use.")
        .def_ro("name", &Device::name)
        .def_ro("description", &Device::description)
        .def_ro("type", &Device::type, "'cpu', 'gpu', 'igpu', 'accel' or 'other'.")
        .def_ro("memory_free", &Device::memory_free, "Free memory in bytes.")
        .def_ro("memory_total", &Device::memory_total, "Total memory in bytes.")
        .def_ro("available", &Device::available,
                "False for an RPC server that does not answer now (its memory then reads 0).")
        .def("__repr__", [](const Device &d) {
            return "Device(name='" + d.name + "', type='" + d.type + "', description='" +
                   d.description + "')";
        });
    m.def("devices", &list_devices, nb::call_guard<nb::gil_scoped_release>(),
          "The devices of every loaded backend (an RPC worker that does not answer: 0 bytes of "
          "memory).");
    m.def("rpc_register", &rpc_register, "endpoints"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Connect to ggml-rpc-server processes ('host:port') and register their devices.");
    m.def("numa_init", &numa_init, "strategy"_a, nb::call_guard<nb::gil_scoped_release>(),
          "llama_numa_init with 'distribute', 'isolate' or 'numactl', once per process. Raises "
          "InvalidArgumentError for another name, or for a strategy other than the one already set.");
    m.def("numa_strategy", &numa_strategy, "The NUMA strategy set in this process (None: none).");
}

// =====================================================================================
// GGUF validation
// =====================================================================================
//
// llama.cpp's loader trusts parts of a GGUF file's metadata that it cannot afford to trust:
// a vocabulary in which two tokens are equal (or empty, or cut short by a NUL byte, which
// llama.cpp reads as the end of the string) trips GGML_ASSERT(id_to_token.size() ==
// token_to_id.size()); an empty one, some malformed BPE tokens and misplaced byte tokens
// abort while the tokenizer is built; layer and expert counts out of range trip the asserts
// of load_hparams; a SentencePiece vocabulary without byte tokens raises IndexError, and an
// RWKV one without single-byte tokens loops forever, at tokenization. An abort takes the
// whole process down, so validate_gguf reads the metadata (gguf, no tensor data) and refuses
// these with a ModelLoadError naming the key and the index before llama_model_load_from_file
// runs. Damage that gguf and llama.cpp already refuse cleanly (truncation, counts and
// lengths past the end of the file, unknown types, tensor extents past the end) is left to
// them, so that their messages stay what they were. tests/test_fuzz_loader.py holds a
// recipe of each input that crashed, and llama_cpp.testing.fuzz_gguf the fuzzer that found
// most of them.

// Whether `text` is well-formed UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF).
bool is_valid_utf8(std::string_view text) {
    size_t i = 0;
    while (i < text.size()) {
        const auto c = static_cast<unsigned char>(text[i]);
        size_t n = 0;
        uint32_t cp = 0;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + n >= text.size()) {
            return false;  // cut short
        }
        for (size_t k = 1; k <= n; ++k) {
            const auto cc = static_cast<unsigned char>(text[i + k]);
            if ((cc & 0xC0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (cc & 0x3F);
        }
        static constexpr uint32_t min_cp[] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return false;
        }
        i += n + 1;
    }
    return true;
}

// A token for a message: printable ASCII as is, anything else as \xNN, at most 40 bytes.
std::string quote_token(std::string_view token) {
    std::string out = "'";
    for (size_t i = 0; i < token.size() && i < 40; ++i) {
        const auto c = static_cast<unsigned char>(token[i]);
        if (c >= 0x20 && c < 0x7F && c != '\\' && c != '\'') {
            out += static_cast<char>(c);
        } else {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\x%02x", c);
            out += buf;
        }
    }
    return out + (token.size() > 40 ? "...'" : "'");
}

// The first byte of an RWKV token once unescaped (\t, \n, \r, \xHH, \<c>), and whether it
// is the token's only byte; nullopt for a token that unescapes to nothing.
std::optional<std::pair<uint8_t, bool>> rwkv_first_byte(std::string_view escaped) {
    std::vector<uint8_t> bytes;
    for (size_t i = 0; i < escaped.size() && bytes.size() < 2; ++i) {
        char c = escaped[i];
        if (c == '\\' && i + 1 < escaped.size()) {
            c = escaped[++i];
            if (c == 'x') {  // as llama.cpp: two digits, lowercase hex, no checking
                if (i + 2 >= escaped.size()) {
                    break;  // cut short: llama.cpp drops it
                }
                uint8_t value = 0;
                for (int k = 0; k < 2; ++k) {
                    const char h = escaped[++i];
                    value = static_cast<uint8_t>((value << 4) + (h >= 'a' ? h - 'a' + 10 : h - '0'));
                }
                bytes.push_back(value);
                continue;
            }
            c = c == 't' ? '\t' : c == 'n' ? '\n' : c == 'r' ? '\r' : c;
        } else if (c == '\\') {
            continue;  // a trailing backslash: nothing
        }
        bytes.push_back(static_cast<uint8_t>(c));
    }
    if (bytes.empty()) {
        return std::nullopt;
    }
    return std::make_pair(bytes[0], bytes.size() == 1);
}

// Refuses the vocabulary of `gguf` (if it has one) where llama.cpp's vocabulary loader would
// abort. `path` is for the messages.
void validate_gguf_vocab(const gguf_context *gguf, const std::string &path) {
    const int64_t tokens_id = gguf_find_key(gguf, "tokenizer.ggml.tokens");
    if (tokens_id < 0 || gguf_get_kv_type(gguf, tokens_id) != GGUF_TYPE_ARRAY ||
        gguf_get_arr_type(gguf, tokens_id) != GGUF_TYPE_STRING) {
        return;  // llama.cpp refuses a missing or mistyped token list with an exception
    }
    const std::string where = "invalid vocabulary in '" + path + "': tokenizer.ggml.tokens";
    const size_t n_tokens = gguf_get_arr_n(gguf, tokens_id);
    if (n_tokens == 0) {
        throw ModelLoadError(where + " is empty");
    }
    // llama.cpp keeps token ids in int32 and reads the count as uint32.
    if (n_tokens > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
        throw ModelLoadError(where + " has " + std::to_string(n_tokens) + " tokens, more than int32 ids can hold");
    }
    std::string model;
    if (const int64_t model_id = gguf_find_key(gguf, "tokenizer.ggml.model");
        model_id >= 0 && gguf_get_kv_type(gguf, model_id) == GGUF_TYPE_STRING) {
        model = gguf_get_val_str(gguf, model_id);
    }
    // GPT-2 style byte-level BPE spells every byte as a code point; llama.cpp decodes the
    // tokens as UTF-8 and aborts on some malformed ones.
    const bool byte_level_bpe = model == "gpt2";

    // Detokenizing a byte token (type 6) parses the byte from its text, "<0xHH>", and aborts
    // for a WordPiece vocabulary, which has no byte tokens.
    const int32_t *types = nullptr;
    if (const int64_t types_id = gguf_find_key(gguf, "tokenizer.ggml.token_type");
        types_id >= 0 && gguf_get_kv_type(gguf, types_id) == GGUF_TYPE_ARRAY &&
        gguf_get_arr_type(gguf, types_id) == GGUF_TYPE_INT32 && gguf_get_arr_n(gguf, types_id) >= n_tokens) {
        types = static_cast<const int32_t *>(gguf_get_arr_data(gguf, types_id));
    }
    constexpr int32_t byte_type = 6;  // LLAMA_TOKEN_TYPE_BYTE
    auto is_byte_spelling = [](std::string_view t) {
        return t.size() == 6 && t.substr(0, 3) == "<0x" && t[5] == '>' &&
               std::isxdigit(static_cast<unsigned char>(t[3])) && std::isxdigit(static_cast<unsigned char>(t[4]));
    };

    // llama.cpp builds its token -> id map from each token read as a C string (up to the
    // first NUL), an empty one renamed "[EMPTY_<id>]", and asserts that no two collide.
    std::unordered_map<std::string_view, uint32_t> seen;
    seen.reserve(n_tokens);
    std::deque<std::string> renamed;  // stable storage for the views of renamed tokens
    for (size_t i = 0; i < n_tokens; ++i) {
        std::string_view token = gguf_get_arr_str(gguf, tokens_id, i);
        if (token.empty()) {
            token = renamed.emplace_back("[EMPTY_" + std::to_string(i) + "]");
        } else if (byte_level_bpe && !is_valid_utf8(token)) {
            throw ModelLoadError(where + "[" + std::to_string(i) + "] " + quote_token(token) +
                                 " is not valid UTF-8, as a byte-level BPE token must be");
        }
        if (types != nullptr && types[i] == byte_type) {
            if (model == "bert") {
                throw ModelLoadError("invalid vocabulary in '" + path + "': tokenizer.ggml.token_type[" +
                                     std::to_string(i) +
                                     "] is 6 (byte), which a WordPiece ('bert') vocabulary cannot have");
            }
            if (!is_byte_spelling(token)) {
                throw ModelLoadError(where + "[" + std::to_string(i) + "] " + quote_token(token) +
                                     " is a byte token (tokenizer.ggml.token_type 6) but not spelled <0xHH>");
            }
        }
        const auto [it, inserted] = seen.emplace(token, static_cast<uint32_t>(i));
        if (!inserted) {
            throw ModelLoadError(where + "[" + std::to_string(i) + "] " + quote_token(token) +
                                 " is the same token as [" + std::to_string(it->second) + "]" +
                                 " (read up to its first NUL byte, as llama.cpp does)");
        }
    }
    // llama.cpp's RWKV tokenizer takes the longest token matching at each position; where a
    // token starts with a byte that is no token by itself, it finds no match of length one and
    // loops forever, appending to its output until memory runs out.
    if (model == "rwkv") {
        std::array<bool, 256> starts{}, alone{};
        for (const auto &[token, id] : seen) {
            if (const auto first = rwkv_first_byte(token)) {
                starts[first->first] = true;
                alone[first->first] = alone[first->first] || first->second;
            }
        }
        for (int byte = 0; byte < 256; ++byte) {
            if (starts[byte] && !alone[byte]) {
                char hex[8];
                std::snprintf(hex, sizeof(hex), "0x%02x", byte);
                throw ModelLoadError(where + ": tokens start with the byte " + hex +
                                     " but none is that byte alone, which the RWKV tokenizer needs");
            }
        }
    }
    // SentencePiece falls back to the byte tokens (<0x41>, else the byte itself) for any text
    // its pieces do not cover, and llama.cpp looks them up with unordered_map::at: a missing
    // one would raise IndexError at tokenization.
    if (model == "llama") {
        for (int byte = 0; byte < 256; ++byte) {
            char name[8];
            std::snprintf(name, sizeof(name), "<0x%02X>", byte);
            const char raw[2] = {static_cast<char>(byte), 0};
            if (seen.find(name) == seen.end() && seen.find(raw) == seen.end()) {
                throw ModelLoadError(where + " has no byte token " + name +
                                     ", which a SentencePiece ('llama') vocabulary needs");
            }
        }
    }
}

// The integer at `key` (the largest element of an integer array), or nullopt if the key is
// missing or not an integer (llama.cpp refuses a mistyped key with an exception).
std::optional<int64_t> gguf_int(const gguf_context *gguf, const std::string &key) {
    const int64_t id = gguf_find_key(gguf, key.c_str());
    if (id < 0) {
        return std::nullopt;
    }
    auto read = [](gguf_type type, const void *data) -> std::optional<int64_t> {
        switch (type) {
            case GGUF_TYPE_UINT8: return *static_cast<const uint8_t *>(data);
            case GGUF_TYPE_INT8: return *static_cast<const int8_t *>(data);
            case GGUF_TYPE_UINT16: return *static_cast<const uint16_t *>(data);
            case GGUF_TYPE_INT16: return *static_cast<const int16_t *>(data);
            case GGUF_TYPE_UINT32: return *static_cast<const uint32_t *>(data);
            case GGUF_TYPE_INT32: return *static_cast<const int32_t *>(data);
            case GGUF_TYPE_UINT64: {
                const uint64_t v = *static_cast<const uint64_t *>(data);
                return v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                           ? std::numeric_limits<int64_t>::max()
                           : static_cast<int64_t>(v);
            }
            case GGUF_TYPE_INT64: return *static_cast<const int64_t *>(data);
            default: return std::nullopt;
        }
    };
    const gguf_type type = gguf_get_kv_type(gguf, id);
    if (type != GGUF_TYPE_ARRAY) {
        return read(type, gguf_get_val_data(gguf, id));
    }
    const gguf_type element = gguf_get_arr_type(gguf, id);
    size_t size = 0;
    switch (element) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: size = 1; break;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: size = 2; break;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: size = 4; break;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: size = 8; break;
        default: return std::nullopt;  // not integers
    }
    std::optional<int64_t> largest;
    const auto *data = static_cast<const char *>(gguf_get_arr_data(gguf, id));
    for (size_t i = 0; i < gguf_get_arr_n(gguf, id); ++i) {
        const auto v = read(element, data + i * size);
        if (!v) {
            return std::nullopt;
        }
        largest = largest ? std::max(*largest, *v) : *v;
    }
    return largest;
}

// Architectures whose graph (src/models/<arch>.cpp at the pinned llama.cpp) opens with asserts
// that the key and value head sizes agree, GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())
// and the like, and that the rotary dimension is the head size, GGML_ASSERT(n_embd_head ==
// n_rot): they fire at the first decode, after a load that went well. Listed by
// scripts/graph_asserts.py from the pinned source (asserts deeper in a graph are not listed:
// a gap, never a valid model refused).
const std::set<std::string> kArchsHeadSizesEqual = {
    "afmoe", "apertus", "arcee", "arctic", "baichuan", "bailingmoe2", "bert", "bitnet", "bloom",
    "chameleon", "chatglm", "codeshell", "cogvlm", "cohere2", "cohere2moe", "command-r", "dbrx",
    "deci", "deepseek", "dflash", "dots1", "dream", "eagle3", "ernie4_5", "ernie4_5-moe",
    "eurobert", "exaone", "exaone-moe", "exaone4", "falcon", "glm4", "glm4moe", "gpt2", "gptneox",
    "granite", "granite_swa", "granitehybrid", "graniteswitch", "grok", "grovemoe", "hunyuan-moe",
    "hunyuan_vl", "hy_v3", "internlm2", "jais", "jais2", "laguna", "llada", "llada-moe", "llama",
    "llama4", "maincoder", "maple", "mellum", "minimax-01", "minimax-m2", "minimax-m3", "mistral3",
    "modern-bert", "mpt", "muse-glimmer", "nanbeige", "nemotron", "nemotron_h", "neo-bert", "olmo",
    "olmo2", "olmoe", "openelm", "orion", "paddleocr", "pangu-embedded", "phi2", "phi3", "plamo",
    "pockettts", "qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen35", "qwen35moe", "qwen3moe",
    "qwen3vl", "qwen3vlmoe", "qwen4exp", "refact", "rnd1", "seed_oss", "smallthinker", "smollm3",
    "spark2_5", "stablelm", "starcoder", "starcoder2", "t5", "talkie", "xverse",
};
const std::set<std::string> kArchsRotIsHeadSize = {
    "apertus", "arcee", "arctic", "baichuan", "chameleon", "codeshell", "cogvlm", "cohere2moe",
    "dbrx", "deci", "deepseek", "dots1", "dream", "ernie4_5", "ernie4_5-moe", "exaone",
    "exaone-moe", "exaone4", "falcon", "granite", "granite_swa", "grok", "grovemoe", "hunyuan-moe",
    "hunyuan_vl", "hy_v3", "internlm2", "jais2", "llada", "llada-moe", "llama", "llama4",
    "maincoder", "mellum", "mistral3", "olmo", "olmo2", "olmoe", "orion", "paddleocr",
    "pangu-embedded", "plamo", "pockettts", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe",
    "qwen3vl", "qwen3vlmoe", "rnd1", "seed_oss", "smallthinker", "smollm3", "starcoder2", "talkie",
    "xverse",
};

// Refuses head sizes (attention.key_length, attention.value_length, rope.dimension_count; the
// first two default to embedding_length / head_count as llama.cpp reads them) that the
// architecture's graph asserts on.
void validate_gguf_head_sizes(const gguf_context *gguf, const std::string &path, const std::string &arch) {
    const bool sizes_equal = kArchsHeadSizesEqual.count(arch) > 0;
    const bool rot_is_size = kArchsRotIsHeadSize.count(arch) > 0;
    if (!sizes_equal && !rot_is_size) {
        return;
    }
    auto key = [&](const char *name) { return arch + "." + name; };
    std::optional<int64_t> fallback;  // n_embd / n_head, with one head count for every layer
    const int64_t head_id = gguf_find_key(gguf, key("attention.head_count").c_str());
    const auto n_embd = gguf_int(gguf, key("embedding_length"));
    const auto n_head = gguf_int(gguf, key("attention.head_count"));
    if (head_id >= 0 && gguf_get_kv_type(gguf, head_id) != GGUF_TYPE_ARRAY && n_embd && n_head && *n_head > 0) {
        fallback = *n_embd / *n_head;
    }
    auto size = [&](const char *name) {
        const auto given = gguf_int(gguf, key(name));
        return given ? given : fallback;
    };
    const auto size_k = size("attention.key_length");
    const auto size_v = size("attention.value_length");
    if (!size_k || !size_v) {
        return;  // llama.cpp reads them otherwise, or refuses the file itself
    }
    const std::string where = "invalid hyperparameters in '" + path + "': ";
    if (sizes_equal && *size_k != *size_v) {
        throw ModelLoadError(where + "the key head size (" + key("attention.key_length") + ") is " +
                             std::to_string(*size_k) + " and the value head size (" + key("attention.value_length") +
                             ") " + std::to_string(*size_v) + "; llama.cpp's " + arch + " graph needs them equal");
    }
    const auto n_rot = gguf_int(gguf, key("rope.dimension_count")).value_or(*size_k);
    if (rot_is_size && n_rot != *size_v) {
        throw ModelLoadError(where + key("rope.dimension_count") + " is " + std::to_string(n_rot) +
                             "; llama.cpp's " + arch + " graph needs it equal to the head size (" +
                             std::to_string(*size_v) + ")");
    }
}

// Refuses the hyperparameters llama.cpp's llama_model::load_hparams asserts on (layer and
// expert counts), in its order. `arch` is general.architecture.
void validate_gguf_hparams(const gguf_context *gguf, const std::string &path, const std::string &arch) {
    constexpr int64_t max_layers = 512;    // LLAMA_MAX_LAYERS at the pinned llama.cpp
    constexpr int64_t max_experts = 1024;  // LLAMA_MAX_EXPERTS
    const std::string where = "invalid hyperparameters in '" + path + "': ";
    auto key = [&](const char *name) { return arch + "." + name; };
    auto refuse = [&](const std::string &name, int64_t value, const std::string &rule) {
        throw ModelLoadError(where + name + " is " + std::to_string(value) + "; " + rule);
    };

    const auto n_layer = gguf_int(gguf, key("block_count"));
    if (!n_layer) {
        return;  // llama.cpp refuses a missing or mistyped block_count with an exception
    }
    if (*n_layer < 1 || *n_layer > max_layers) {
        refuse(key("block_count"), *n_layer, "llama.cpp takes 1 to " + std::to_string(max_layers));
    }
    if (const auto nextn = gguf_int(gguf, key("nextn_predict_layers")); nextn && (*nextn < 0 || *nextn > *n_layer)) {
        refuse(key("nextn_predict_layers"), *nextn, "it must be 0 to block_count (" + std::to_string(*n_layer) + ")");
    }
    // Hunyuan models write expert_count 1 for a dense model; llama.cpp resets it to 0.
    if (arch == "hunyuan-vl" || arch == "hunyuan-dense") {
        return;
    }
    const int64_t n_expert = gguf_int(gguf, key("expert_count")).value_or(0);
    const int64_t n_used = gguf_int(gguf, key("expert_used_count")).value_or(0);
    const int64_t n_groups = gguf_int(gguf, key("expert_group_count")).value_or(0);
    const int64_t n_group_used = gguf_int(gguf, key("expert_group_used_count")).value_or(0);
    if (n_expert < 0 || n_expert > max_experts) {
        refuse(key("expert_count"), n_expert, "llama.cpp takes 0 to " + std::to_string(max_experts));
    }
    if (n_used < 0 || n_used > n_expert) {
        refuse(key("expert_used_count"), n_used,
               "it must be 0 to expert_count (" + std::to_string(n_expert) + ")");
    }
    if (n_expert > 0) {
        if (n_used == 0) {
            refuse(key("expert_used_count"), n_used, "a model with experts must use at least one");
        }
        if (n_groups < 0 || n_groups >= n_expert) {
            refuse(key("expert_group_count"), n_groups,
                   "it must be below expert_count (" + std::to_string(n_expert) + ")");
        }
        if (n_groups > 1 && n_expert % n_groups != 0) {
            refuse(key("expert_group_count"), n_groups,
                   "it must divide expert_count (" + std::to_string(n_expert) + ")");
        }
        if (n_groups > 1 && (n_group_used <= 0 || n_group_used >= n_groups)) {
            refuse(key("expert_group_used_count"), n_group_used,
                   "it must be 1 to expert_group_count - 1 (" + std::to_string(n_groups - 1) + ")");
        }
    } else if (n_groups != 0) {
        refuse(key("expert_group_count"), n_groups, "a model without experts has no expert groups");
    }
}

// Refuses a loaded vocabulary whose tokenizer must add a special token it does not have: a
// BOS or EOS id missing or out of range (llama.cpp then disables it, with a warning) while
// tokenizer.ggml.add_bos_token / add_eos_token (or the tokenizer's default) asks for it, or
// a WordPiece vocabulary without [CLS] and [SEP]. llama.cpp asserts on them at the first
// tokenization with special tokens, so they are checked after the load, where llama.cpp's
// own defaults for each tokenizer have been applied.
void validate_loaded_vocab(const llama_vocab *vocab, const std::string &path) {
    const std::string where = "invalid vocabulary in '" + path + "': ";
    auto require = [&](llama_token id, const char *what, const char *why) {
        if (id == LLAMA_TOKEN_NULL) {
            throw ModelLoadError(where + "no " + what + " token (its id is missing or out of range), but " + why);
        }
    };
    if (llama_vocab_type(vocab) == LLAMA_VOCAB_TYPE_WPM) {
        require(llama_vocab_bos(vocab), "BOS ([CLS])", "a WordPiece tokenizer adds it");
        require(llama_vocab_sep(vocab), "SEP", "a WordPiece tokenizer adds it");
        return;
    }
    if (llama_vocab_get_add_bos(vocab)) {
        require(llama_vocab_bos(vocab), "BOS", "the tokenizer adds one (tokenizer.ggml.add_bos_token)");
    }
    if (llama_vocab_get_add_eos(vocab)) {
        require(llama_vocab_eos(vocab), "EOS", "the tokenizer adds one (tokenizer.ggml.add_eos_token)");
    }
}

// Refuses tensors that start at a file offset that is not a multiple of 32 bytes (ggml's
// TENSOR_ALIGNMENT). A file whose general.alignment is a smaller power of two (1, 2, 8) is
// valid GGUF, but llama.cpp maps its weights in place and the CPU backend asserts that the
// mapped pointer is aligned. Files written with the default alignment (32) always pass.
void validate_gguf_tensor_alignment(const gguf_context *gguf, const std::string &path) {
    constexpr size_t tensor_alignment = 32;
    const size_t data_offset = gguf_get_data_offset(gguf);
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf); ++i) {
        const size_t offset = data_offset + gguf_get_tensor_offset(gguf, i);
        if (offset % tensor_alignment != 0) {
            throw ModelLoadError("invalid tensor layout in '" + path + "': tensor '" + gguf_get_tensor_name(gguf, i) +
                                 "' starts at file offset " + std::to_string(offset) +
                                 ", not a multiple of 32 bytes (general.alignment is " +
                                 std::to_string(gguf_get_alignment(gguf)) + "), which llama.cpp needs to map it");
        }
    }
}

// Checks the GGUF file at `path` before llama.cpp loads it (see the section's comment); the
// hyperparameters only for a full load, as llama.cpp reads none for a vocabulary. Raises
// ModelLoadError; a file gguf cannot parse is left to llama.cpp's loader, which refuses it
// with gguf's own message.
void validate_gguf(const std::string &path, bool vocab_only) {
    gguf_init_params params{/*no_alloc=*/true, /*ctx=*/nullptr};
    const std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf(gguf_init_from_file(path.c_str(), params),
                                                                   &gguf_free);
    if (!gguf) {
        return;
    }
    validate_gguf_vocab(gguf.get(), path);
    if (!vocab_only) {
        validate_gguf_tensor_alignment(gguf.get(), path);
    }
    const int64_t arch_id = gguf_find_key(gguf.get(), "general.architecture");
    if (!vocab_only && arch_id >= 0 && gguf_get_kv_type(gguf.get(), arch_id) == GGUF_TYPE_STRING) {
        validate_gguf_hparams(gguf.get(), path, gguf_get_val_str(gguf.get(), arch_id));
        validate_gguf_head_sizes(gguf.get(), path, gguf_get_val_str(gguf.get(), arch_id));
    }
}

// =====================================================================================
// Model
// =====================================================================================

// Hands freed heap memory back to the OS at once (glibc keeps it in its arenas otherwise), so
// that closing a model or context shows in the process's RSS.
void release_free_memory() {
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

struct ModelDeleter {
    void operator()(llama_model *model) const {
        llama_model_free(model);
        release_free_memory();
    }
};
using ModelHandle = std::shared_ptr<llama_model>;

struct ModelOptions {
    int n_gpu_layers = 0;
    int split_mode = LLAMA_SPLIT_MODE_LAYER;
    int main_gpu = 0;
    std::vector<float> tensor_split;
    bool vocab_only = false;
    bool use_mmap = true;
    bool use_mlock = false;
    bool check_tensors = false;
    bool verbose = true;  // false: llama.cpp logs only errors while loading
    std::vector<std::string> rpc_servers;  // offload to these servers' devices (and no other server's)
    // Tensor placement, as llama.cpp's --override-tensor, --cpu-moe and --n-cpu-moe: (regex,
    // device name) pairs tried in order (the first whose regex_search matches a tensor's name
    // wins), then cpu_moe's pattern, then n_cpu_moe's one pattern per layer.
    std::vector<std::pair<std::string, std::string>> tensor_overrides;
    bool cpu_moe = false;
    int n_cpu_moe = 0;
    // GGUF metadata overrides (llama-cpp-python's kv_overrides); bool before int64 so that
    // Python's True stays a bool.
    std::vector<std::pair<std::string, std::variant<bool, int64_t, double, std::string>>> kv_overrides;
    // Called as progress_callback(fraction) while the weights load (None: not called). Only
    // ever read by reference while Model's constructor runs, so no copy of the options
    // touches its reference count without the GIL.
    nb::object progress_callback = nb::none();
};

// Hands llama.cpp's load progress (a float in [0, 1], from the loading thread, which runs
// with the GIL released) to a Python callable. The GIL is re-acquired only inside the call.
// A callback that returns False cancels the load. One that raises must not unwind through
// llama.cpp: its exception is kept here, the load is cancelled, and the binding raises it
// again (chained under a ModelLoadError) once the constructor has returned.
class LoadProgress {
  public:
    // `callback` is borrowed: the ModelOptions argument holds it for the whole load.
    explicit LoadProgress(nb::handle callback) : callback_(callback) {}
    LoadProgress(const LoadProgress &) = delete;
    LoadProgress &operator=(const LoadProgress &) = delete;
    // Destroyed with the GIL held (see the binding of Model's constructor).
    ~LoadProgress() { discard(); }

    static bool call(float progress, void *user_data) {
        auto *self = static_cast<LoadProgress *>(user_data);
        nb::gil_scoped_acquire gil;
        PyObject *result = PyObject_CallFunction(self->callback_.ptr(), "d", static_cast<double>(progress));
        if (result == nullptr) {
            PyErr_Fetch(&self->type_, &self->value_, &self->traceback_);
            PyErr_NormalizeException(&self->type_, &self->value_, &self->traceback_);
            self->reason_ = "the progress callback raised " + describe(self->type_, self->value_);
            return false;
        }
        const bool cancel = result == Py_False;
        Py_DECREF(result);
        if (cancel) {
            self->reason_ = "the progress callback returned False";
        }
        return !cancel;
    }

    bool stopped() const { return !reason_.empty(); }
    const std::string &reason() const { return reason_; }
    bool raised() const { return value_ != nullptr; }
    // An interrupt (KeyboardInterrupt, SystemExit) rather than an error of the callback.
    bool interrupted() const {
        return type_ != nullptr && !PyErr_GivenExceptionMatches(type_, PyExc_Exception);
    }

    // Makes the kept exception the pending Python error again (GIL held).
    void restore() {
        PyErr_Restore(type_, value_, traceback_);
        type_ = value_ = traceback_ = nullptr;
    }

  private:
    static std::string describe(PyObject *type, PyObject *value) {
        std::string text = reinterpret_cast<PyTypeObject *>(type)->tp_name;
        if (PyObject *str = value != nullptr ? PyObject_Str(value) : nullptr) {
            if (const char *utf8 = PyUnicode_AsUTF8(str); utf8 != nullptr && *utf8 != '\0') {
                text += std::string(": ") + utf8;
            }
            Py_DECREF(str);
        }
        PyErr_Clear();  // a failing __str__ only shortens the message
        return text;
    }

    void discard() {
        Py_XDECREF(type_);
        Py_XDECREF(value_);
        Py_XDECREF(traceback_);
        type_ = value_ = traceback_ = nullptr;
    }

    nb::handle callback_;
    PyObject *type_ = nullptr;
    PyObject *value_ = nullptr;
    PyObject *traceback_ = nullptr;
    std::string reason_;
};

std::string format_size(uint64_t bytes) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
    return buf;
}

// The llama_model_params of `options` for the file at `path`, and the storage they point into
// (so an instance is neither copied nor moved). Everything is checked here, before anything
// is loaded: the file (ModelLoadError), tensor_split, kv_overrides and tensor overrides
// (InvalidArgumentError: a regex std::regex rejects, as llama.cpp's loader would abort on it,
// or a device this model cannot use), and the RPC servers (what rpc_register raises).
class ModelParams {
  public:
    ModelParams(const std::string &path, const ModelOptions &options) {
        check_file(path);
        validate_gguf(path, options.vocab_only);
        params = llama_model_default_params();
        params.n_gpu_layers = options.n_gpu_layers;
        params.split_mode = static_cast<llama_split_mode>(options.split_mode);
        params.main_gpu = options.main_gpu;
        if (!options.tensor_split.empty()) {
            if (options.tensor_split.size() > llama_max_devices()) {
                throw InvalidArgumentError("tensor_split has more entries than llama_max_devices()");
            }
            tensor_split_ = options.tensor_split;
            tensor_split_.resize(llama_max_devices(), 0.0f);
            params.tensor_split = tensor_split_.data();
        }
        check_patterns(options);
        if (!options.rpc_servers.empty()) {
            rpc_register(options.rpc_servers);
        }
        devices_ = offload_devices(options.rpc_servers);
        params.devices = devices_.data();
        build_tensor_overrides(options);
        if (overrides_.size() > 1) {
            params.tensor_buft_overrides = overrides_.data();
        }
        params.vocab_only = options.vocab_only;
        // llama-cpp-python's use_mmap/use_mlock map onto llama.cpp's load mode.
        if (options.use_mlock) {
            params.load_mode = options.use_mmap ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MLOCK;
        } else if (!options.use_mmap) {
            params.load_mode = LLAMA_LOAD_MODE_NONE;
        }
        params.check_tensors = options.check_tensors;
        if (!options.kv_overrides.empty()) {
            check_override_types(path, options.kv_overrides);
            kv_overrides_ = build_kv_overrides(options.kv_overrides);
            params.kv_overrides = kv_overrides_.data();
        }
    }
    ModelParams(const ModelParams &) = delete;
    ModelParams &operator=(const ModelParams &) = delete;

    llama_model_params params;

    // The tensor overrides (without the terminating entry).
    std::vector<llama_model_tensor_buft_override> tensor_overrides() const {
        return overrides_.empty() ? overrides_ : std::vector(overrides_.begin(), overrides_.end() - 1);
    }

  private:
    static void check_file(const std::string &path) {
        struct stat st {};
        if (::stat(path.c_str(), &st) != 0) {
            throw ModelLoadError("model file not found: '" + path + "'");
        }
        if (!S_ISREG(st.st_mode)) {
            throw ModelLoadError("model path is not a regular file: '" + path + "'");
        }
        if (std::FILE *f = std::fopen(path.c_str(), "rb")) {
            char magic[4] = {0, 0, 0, 0};
            size_t n = std::fread(magic, 1, 4, f);
            std::fclose(f);
            if (n != 4 || std::string_view(magic, 4) != "GGUF") {
                throw ModelLoadError("not a GGUF file (bad magic): '" + path + "'");
            }
        } else {
            throw ModelLoadError("cannot open model file: '" + path + "'");
        }
    }

    // llama.cpp's loader compiles each pattern with std::regex (ECMAScript) and calls
    // regex_search; a pattern it cannot compile would throw inside the load. Same engine here.
    static void check_patterns(const ModelOptions &options) {
        for (const auto &[pattern, device] : options.tensor_overrides) {
            try {
                std::regex compiled(pattern);
            } catch (const std::regex_error &e) {
                throw InvalidArgumentError("tensor_overrides: invalid regex '" + pattern + "': " + e.what());
            }
        }
        if (options.n_cpu_moe < 0) {
            throw InvalidArgumentError("n_cpu_moe must be >= 0, got " + std::to_string(options.n_cpu_moe));
        }
        const size_t count = options.tensor_overrides.size() + (options.cpu_moe ? 1 : 0) +
                             static_cast<size_t>(options.n_cpu_moe);
        if (count >= llama_max_tensor_buft_overrides()) {
            throw InvalidArgumentError("tensor_overrides, cpu_moe and n_cpu_moe make " + std::to_string(count) +
                                       " overrides; llama.cpp takes fewer than " +
                                       std::to_string(llama_max_tensor_buft_overrides()));
        }
    }

    // The buffer type of the device named `name` (as llama_cpp.devices() names it): the CPU or
    // one of the devices this model offloads to (a tensor on another process's device would
    // have no backend in this model's contexts).
    // The name of device `i`'s buffer type. An RPC device's is written here, as ggml-rpc
    // writes it (RPC<index within its server>[endpoint]): asking the backend would be a call
    // to the server (for any RPC device, this model's or not, reachable or not).
    static std::string buffer_type_name(size_t i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (is_rpc_device(dev)) {
            const std::string endpoint = ggml_backend_dev_description(dev);
            size_t index = 0;
            for (size_t j = 0; j < i; ++j) {
                ggml_backend_dev_t other = ggml_backend_dev_get(j);
                if (is_rpc_device(other) && endpoint == ggml_backend_dev_description(other)) ++index;
            }
            return "RPC" + std::to_string(index) + "[" + endpoint + "]";
        }
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
        return buft != nullptr ? ggml_backend_buft_name(buft) : ggml_backend_dev_name(dev);
    }

    // `name` is a device's name as devices() lists it (CPU, CUDA0, RPC0) or the name of its
    // buffer type, which llama.cpp's --override-tensor takes (RPC0[host:port] for an RPC
    // server's device: the index within that server, then its endpoint).
    ggml_backend_buffer_type_t device_buffer_type(const std::string &name) const {
        std::string known;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            const std::string dev_name = ggml_backend_dev_name(dev);
            const std::string buft_name = buffer_type_name(i);
            known += (known.empty() ? "" : ", ") + dev_name + (buft_name != dev_name ? " or " + buft_name : "");
            if (dev_name != name && buft_name != name) continue;
            const bool usable = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU ||
                                std::find(devices_.begin(), devices_.end(), dev) != devices_.end();
            if (!usable) {
                throw InvalidArgumentError("tensor_overrides: device '" + name +
                                           "' is not one this model uses (an RPC device needs its "
                                           "server in rpc_servers)");
            }
            ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
            if (buft == nullptr) {
                throw InvalidArgumentError("tensor_overrides: device '" + name + "' has no buffer type");
            }
            return buft;
        }
        throw InvalidArgumentError("tensor_overrides: unknown device '" + name + "' (devices: " + known + ")");
    }

    // As common/arg.cpp builds them: the user's pairs, then --cpu-moe's pattern, then
    // --n-cpu-moe's per-layer patterns, with common.h's own regexes.
    void build_tensor_overrides(const ModelOptions &options) {
        auto add = [&](std::string pattern, ggml_backend_buffer_type_t buft) {
            patterns_.push_back(std::move(pattern));
            overrides_.push_back({patterns_.back().c_str(), buft});
        };
        for (const auto &[pattern, device] : options.tensor_overrides) {
            add(pattern, device_buffer_type(device));
        }
        if (options.cpu_moe) {
            add(LLM_FFN_EXPS_REGEX, ggml_backend_cpu_buffer_type());
        }
        for (int layer = 0; layer < options.n_cpu_moe; ++layer) {
            add(llm_ffn_block_regex(layer, LLM_FFN_EXPS_REGEX), ggml_backend_cpu_buffer_type());
        }
        if (!overrides_.empty()) {
            overrides_.push_back({nullptr, nullptr});
        }
    }

    // llama.cpp ignores an override whose type differs from the stored value's, with only a
    // warning: a silently wrong model. Compare against the file's metadata and refuse instead.
    static void check_override_types(
        const std::string &path,
        const std::vector<std::pair<std::string, std::variant<bool, int64_t, double, std::string>>> &overrides) {
        gguf_init_params params{/*no_alloc=*/true, /*ctx=*/nullptr};
        std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf(gguf_init_from_file(path.c_str(), params), &gguf_free);
        if (!gguf) {
            return;  // the load itself reports what is wrong with the file
        }
        for (const auto &[key, value] : overrides) {
            const int64_t id = gguf_find_key(gguf.get(), key.c_str());
            if (id < 0) continue;  // not stored: llama.cpp uses the override where it reads the key
            const gguf_type stored = gguf_get_kv_type(gguf.get(), id);
            bool ok = false;
            switch (stored) {
            case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
            case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
                ok = std::holds_alternative<int64_t>(value); break;
            case GGUF_TYPE_FLOAT32: case GGUF_TYPE_FLOAT64: ok = std::holds_alternative<double>(value); break;
            case GGUF_TYPE_BOOL: ok = std::holds_alternative<bool>(value); break;
            case GGUF_TYPE_STRING: ok = std::holds_alternative<std::string>(value); break;
            default: ok = false; break;
            }
            if (!ok) {
                static const char *names[] = {"bool", "int", "float", "str"};
                throw InvalidArgumentError("kv_overrides['" + key + "'] is a " + names[value.index()] +
                                           ", but the model stores a " + gguf_type_name(stored));
            }
        }
    }

    static std::vector<llama_model_kv_override> build_kv_overrides(
        const std::vector<std::pair<std::string, std::variant<bool, int64_t, double, std::string>>> &overrides) {
        std::vector<llama_model_kv_override> out;
        for (const auto &[key, value] : overrides) {
            llama_model_kv_override o{};
            if (key.empty() || key.size() >= sizeof(o.key)) {
                throw InvalidArgumentError("kv_overrides key must have 1 to 127 bytes: '" + key + "'");
            }
            std::memcpy(o.key, key.c_str(), key.size() + 1);
            if (const auto *b = std::get_if<bool>(&value)) {
                o.tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
                o.val_bool = *b;
            } else if (const auto *i = std::get_if<int64_t>(&value)) {
                o.tag = LLAMA_KV_OVERRIDE_TYPE_INT;
                o.val_i64 = *i;
            } else if (const auto *f = std::get_if<double>(&value)) {
                o.tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT;
                o.val_f64 = *f;
            } else {
                const auto &str = std::get<std::string>(value);
                if (str.size() >= sizeof(o.val_str)) {
                    throw InvalidArgumentError("kv_overrides value of '" + key + "' must have < 128 bytes");
                }
                o.tag = LLAMA_KV_OVERRIDE_TYPE_STR;
                std::memcpy(o.val_str, str.c_str(), str.size() + 1);
            }
            out.push_back(o);
        }
        out.push_back(llama_model_kv_override{});  // key[0] == 0 ends the list
        return out;
    }

    // The devices layers may go to: every local accelerator, and the RPC servers this model
    // asked for (not those another model registered in this process). Null-terminated.
    // Local devices are chosen as llama.cpp chooses them when given none: the GPUs, or the
    // integrated GPUs if there is no discrete one (CPU and accelerator devices never hold layers).
    static std::vector<ggml_backend_dev_t> offload_devices(const std::vector<std::string> &rpc_servers) {
        std::vector<ggml_backend_dev_t> gpus, igpus, out;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (is_rpc_device(dev)) {
                const std::string endpoint = ggml_backend_dev_description(dev);
                if (std::find(rpc_servers.begin(), rpc_servers.end(), endpoint) != rpc_servers.end()) {
                    out.push_back(dev);
                }
            } else if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) {
                gpus.push_back(dev);
            } else if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_IGPU) {
                igpus.push_back(dev);
            }
        }
        const auto &local = gpus.empty() ? igpus : gpus;
        out.insert(out.end(), local.begin(), local.end());
        out.push_back(nullptr);
        return out;
    }

    std::vector<float> tensor_split_;
    std::vector<llama_model_kv_override> kv_overrides_;
    std::vector<ggml_backend_dev_t> devices_;
    std::deque<std::string> patterns_;  // stable addresses: overrides_ points into them
    std::vector<llama_model_tensor_buft_override> overrides_;  // null-terminated when not empty
};

// A loaded llama_model. The handle is shared with every Context made from it, so closing the
// Model while a context still runs only drops this object's reference.
class Model {
  public:
    // `progress` (may be null) reports the load; it must outlive the constructor call.
    Model(const std::string &path, const ModelOptions &options, LoadProgress *progress = nullptr)
        : path_(path) {
        QuietScope quiet(!options.verbose);
        ModelParams built(path, options);
        llama_model_params params = built.params;

        if (progress != nullptr) {
            params.progress_callback = &LoadProgress::call;
            params.progress_callback_user_data = progress;
        }

        tl_last_errors.clear();
        llama_model *model = llama_model_load_from_file(path.c_str(), params);
        if (progress != nullptr && progress->stopped()) {
            if (model != nullptr) {  // not expected: llama.cpp fails a cancelled load
                llama_model_free(model);
            }
            throw ModelLoadError("loading '" + path + "' was cancelled: " + progress->reason());
        }
        if (model == nullptr) {
            const std::string reason = last_errors_or("see the llama_cpp log");
            throw ModelLoadError("failed to load model from '" + path + "': " + reason);
        }
        handle_ = ModelHandle(model, ModelDeleter());
        vocab_ = llama_model_get_vocab(model);
        validate_loaded_vocab(vocab_, path);  // frees the model (handle_) if it throws
        expert_used_override_ = arch_int_override(model, options, "expert_used_count");
    }

    // Every method that reads the weights or the vocabulary holds the handle this returns
    // for as long as it reads them: close() in another thread then only drops its own
    // reference, and the memory goes when the last reader is done.
    ModelHandle handle() const {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!handle_) {
            throw ClosedError("the model is closed");
        }
        return handle_;
    }

    // Called with the GIL released: freeing the weights (and trimming the heap) takes a while.
    void close() {
        ModelHandle dropped;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            dropped.swap(handle_);
        }
        // `dropped` goes here, outside the lock: the free may run now or, if a method in
        // another thread still holds the handle, when that method returns.
    }

    bool closed() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return !handle_;
    }

    const std::string &path() const { return path_; }

    // The kv_override of `<arch>.expert_used_count`, or -1 when it is not overridden: llama.cpp's
    // loader reads the hparam through the overrides, while llama_model_meta_val_str returns the
    // file's value, and nothing public returns the effective one.
    int64_t expert_used_override() const { return expert_used_override_; }

    std::vector<llama_token> tokenize(const std::string &text, bool add_special,
                                      bool parse_special) const {
        ModelHandle keep = handle();
        return tokenize_with(vocab_, text, add_special, parse_special);
    }

    static std::vector<llama_token> tokenize_with(const llama_vocab *vocab, const std::string &text,
                                                  bool add_special, bool parse_special) {
        if (text.size() > static_cast<size_t>(INT32_MAX)) {
            throw InvalidArgumentError("text is too long to tokenize");
        }
        const auto len = static_cast<int32_t>(text.size());
        std::vector<llama_token> tokens(static_cast<size_t>(len) + 2);
        // Some pre-tokenizers (MPT's, Qwen 3.5's) decode the text as UTF-8 and throw
        // std::invalid_argument ("invalid codepoint") through the C API on invalid bytes.
        auto run = [&]() {
            try {
                return llama_tokenize(vocab, text.data(), len, tokens.data(), static_cast<int32_t>(tokens.size()),
                                      add_special, parse_special);
            } catch (const std::invalid_argument &e) {
                throw InvalidArgumentError(std::string("this tokenizer cannot tokenize the text (") + e.what() +
                                           "): it must be valid UTF-8");
            }
        };
        int32_t n = run();
        if (n == INT32_MIN) {
            throw InvalidArgumentError("tokenization overflowed int32");
        }
        if (n < 0) {
            tokens.resize(static_cast<size_t>(-n));
            n = run();
            if (n < 0) {
                throw LlamaError("llama_tokenize failed");
            }
        }
        tokens.resize(static_cast<size_t>(n));
        return tokens;
    }

    std::string token_to_piece(llama_token token, bool special) const {
        ModelHandle keep = handle();
        check_token(vocab_, token);
        return piece_with(vocab_, token, special);
    }

    static std::string piece_with(const llama_vocab *vocab, llama_token token, bool special) {
        char small[64];
        int32_t n = llama_token_to_piece(vocab, token, small, sizeof(small), 0, special);
        if (n >= 0) {
            return std::string(small, static_cast<size_t>(n));
        }
        std::string piece(static_cast<size_t>(-n), '\0');
        n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0,
                                 special);
        if (n < 0) {
            throw LlamaError("llama_token_to_piece failed");
        }
        piece.resize(static_cast<size_t>(n));
        return piece;
    }

    std::string detokenize(const std::vector<llama_token> &tokens, bool special) const {
        ModelHandle keep = handle();
        for (llama_token t : tokens) {
            check_token(vocab_, t);
        }
        // Concatenated pieces, as llama-cpp-python does: no leading-space stripping, so that
        // detokenize(a) + detokenize(b) == detokenize(a + b) holds.
        std::string out;
        for (llama_token t : tokens) {
            out += piece_with(vocab_, t, special);
        }
        return out;
    }

    // The caller holds the model's handle.
    static void check_token(const llama_vocab *vocab, llama_token token) {
        if (token < 0 || token >= llama_vocab_n_tokens(vocab)) {
            throw InvalidArgumentError("token id " + std::to_string(token) +
                                       " is out of range [0, " +
                                       std::to_string(llama_vocab_n_tokens(vocab)) + ")");
        }
    }

    std::vector<std::pair<std::string, std::string>> metadata() const {
        ModelHandle keep = handle();
        std::vector<std::pair<std::string, std::string>> out;
        const int32_t count = llama_model_meta_count(keep.get());
        std::vector<char> key(256), value(4096);
        for (int32_t i = 0; i < count; ++i) {
            out.emplace_back(meta_string(keep.get(), i, key, true),
                             meta_string(keep.get(), i, value, false));
        }
        return out;
    }

    std::string description() const {
        ModelHandle keep = handle();
        char buf[256];
        int32_t n = llama_model_desc(keep.get(), buf, sizeof(buf));
        return std::string(buf, static_cast<size_t>(std::max(n, 0)));
    }

    std::optional<std::string> chat_template() const {
        ModelHandle keep = handle();
        const char *tmpl = llama_model_chat_template(keep.get(), nullptr);
        if (tmpl == nullptr) {
            return std::nullopt;
        }
        return std::string(tmpl);
    }

  private:
    static std::string meta_string(const llama_model *model, int32_t i, std::vector<char> &buf,
                                   bool key) {
        auto read = [&]() {
            return key ? llama_model_meta_key_by_index(model, i, buf.data(), buf.size())
                       : llama_model_meta_val_str_by_index(model, i, buf.data(), buf.size());
        };
        int32_t n = read();
        if (n >= static_cast<int32_t>(buf.size())) {
            buf.resize(static_cast<size_t>(n) + 1);
            n = read();
        }
        return n < 0 ? std::string() : std::string(buf.data(), static_cast<size_t>(n));
    }

    // The integer kv_override of `<arch>.<name>` among `options`, or -1.
    static int64_t arch_int_override(const llama_model *model, const ModelOptions &options, const char *name) {
        char arch[128];
        if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch)) < 0) return -1;
        const std::string key = std::string(arch) + "." + name;
        for (const auto &[k, value] : options.kv_overrides) {
            if (k == key && std::holds_alternative<int64_t>(value)) return std::get<int64_t>(value);
        }
        return -1;
    }

    std::string path_;
    int64_t expert_used_override_ = -1;
    mutable std::mutex mutex_;  // guards handle_
    ModelHandle handle_;
    const llama_vocab *vocab_ = nullptr;
};

// Runs f(model, vocab) holding the model's handle (ClosedError once the model is closed).
template <typename F>
auto with_model(const Model &model, F &&f) {
    ModelHandle keep = model.handle();
    return f(keep.get(), llama_model_get_vocab(keep.get()));
}

// A LoRA adapter loaded for a model. It keeps the model alive and frees itself (not the
// model) when the last reference goes: the Python object and any context applying it.
struct LoraData {
    ModelHandle model;
    llama_adapter_lora *adapter = nullptr;
    std::string path;
    LoraData() = default;
    LoraData(const LoraData &) = delete;
    LoraData &operator=(const LoraData &) = delete;
    ~LoraData() {
        if (adapter != nullptr) llama_adapter_lora_free(adapter);
    }
};

class LoraAdapter {
  public:
    LoraAdapter(const Model &model, const std::string &path) : data_(std::make_shared<LoraData>()) {
        data_->model = model.handle();
        data_->path = path;
        struct stat st {};
        if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
            throw ModelLoadError("LoRA adapter not found: '" + path + "'");
        }
        tl_last_errors.clear();
        data_->adapter = llama_adapter_lora_init(data_->model.get(), path.c_str());
        if (data_->adapter == nullptr) {
            const std::string reason = last_errors_or("see the llama_cpp log");
            throw ModelLoadError("failed to load LoRA adapter '" + path + "': " + reason);
        }
    }
    explicit LoraAdapter(std::shared_ptr<LoraData> data) : data_(std::move(data)) {}
    const std::shared_ptr<LoraData> &data() const { return data_; }
    const std::string &path() const { return data_->path; }

  private:
    std::shared_ptr<LoraData> data_;
};

// Adapters and their scales, as a context applies them.
using LoraSet = std::vector<std::pair<std::shared_ptr<LoraData>, float>>;

// Raises InvalidArgumentError unless `lora` belongs to `model` and `scale` is finite.
void check_lora(const LoraAdapter &lora, const ModelHandle &model, float scale) {
    if (lora.data()->model != model) {
        throw InvalidArgumentError("the LoRA adapter '" + lora.path() + "' was loaded for another model");
    }
    if (!std::isfinite(scale)) {
        throw InvalidArgumentError("the LoRA scale must be finite, got " + std::to_string(scale));
    }
}

// Makes `ctx` apply exactly `loras` (llama.cpp applies adapters per context, to every
// sequence of the next decode).
void set_context_loras(llama_context *ctx, const LoraSet &loras) {
    std::vector<llama_adapter_lora *> adapters;
    std::vector<float> scales;
    for (const auto &[data, scale] : loras) {
        adapters.push_back(data->adapter);
        scales.push_back(scale);
    }
    if (llama_set_adapters_lora(ctx, adapters.data(), adapters.size(), scales.data()) != 0) {
        throw LlamaError("llama_set_adapters_lora failed");
    }
}

// -- Memory: llama.cpp's own accounting of what a context and its model hold, by device.

// {device name: {"model": bytes, "context": bytes, "compute": bytes}}: every device of the
// model and "CPU", host buffer types (mapped files, pinned memory) counted as "CPU", as
// llama.cpp's common_memory_breakdown_print counts them.
using MemoryBreakdown = std::map<std::string, std::map<std::string, size_t>>;

MemoryBreakdown memory_breakdown(const llama_context *ctx) {
    MemoryBreakdown out;
    auto add = [&](const std::string &device, const llama_memory_breakdown_data &mb) {
        auto &row = out[device];
        row["model"] += mb.model;
        row["context"] += mb.context;
        row["compute"] += mb.compute;
    };
    const llama_model *model = llama_get_model(ctx);
    add("CPU", {});
    for (int32_t i = 0; i < llama_model_n_devices(model); ++i) {
        add(ggml_backend_dev_name(llama_model_get_device(model, i)), {});
    }
    for (const auto &[buft, mb] : llama_get_memory_breakdown(ctx)) {
        ggml_backend_dev_t dev = ggml_backend_buft_is_host(buft) ? nullptr : ggml_backend_buft_get_device(buft);
        if (dev != nullptr) {
            add(ggml_backend_dev_name(dev), mb);
        } else {
            add(ggml_backend_buft_is_host(buft) ? "CPU" : ggml_backend_buft_name(buft), mb);
        }
    }
    return out;
}

void bind_model(nb::module_ &m) {
    nb::class_<ModelOptions>(m, "ModelOptions", "Options for loading a model (llama_model_params).")
        .def(nb::init<>())
        .def_rw("n_gpu_layers", &ModelOptions::n_gpu_layers)
        .def_rw("split_mode", &ModelOptions::split_mode)
        .def_rw("main_gpu", &ModelOptions::main_gpu)
        .def_rw("tensor_split", &ModelOptions::tensor_split)
        .def_rw("vocab_only", &ModelOptions::vocab_only)
        .def_rw("use_mmap", &ModelOptions::use_mmap)
        .def_rw("use_mlock", &ModelOptions::use_mlock)
        .def_rw("check_tensors", &ModelOptions::check_tensors)
        .def_rw("verbose", &ModelOptions::verbose)
        .def_rw("rpc_servers", &ModelOptions::rpc_servers)
        .def_rw("tensor_overrides", &ModelOptions::tensor_overrides,
                "(regex, device name) pairs, as llama.cpp's --override-tensor; the first match wins.")
        .def_rw("cpu_moe", &ModelOptions::cpu_moe, "Every expert tensor in host memory (--cpu-moe).")
        .def_rw("n_cpu_moe", &ModelOptions::n_cpu_moe,
                "The expert tensors of the first N layers in host memory (--n-cpu-moe).")
        .def_rw("kv_overrides", &ModelOptions::kv_overrides)
        .def_prop_rw(
            "progress_callback", [](const ModelOptions &o) { return o.progress_callback; },
            [](ModelOptions &o, nb::object callback) {
                if (!callback.is_none() && !PyCallable_Check(callback.ptr())) {
                    throw nb::type_error("progress_callback must be a callable or None");
                }
                o.progress_callback = std::move(callback);
            },
            nb::for_getter(nb::sig("def progress_callback(self, /) -> "
                                   "collections.abc.Callable[[float], bool | None] | None")),
            nb::for_setter(nb::sig("def progress_callback(self, arg: "
                                   "collections.abc.Callable[[float], bool | None] | None, /) -> None")),
            nb::for_setter(nb::arg("callback").none()),
            "Called with the fraction loaded (0..1) while the weights load; False cancels.");

    nb::class_<LoraAdapter>(m, "LoraAdapter", "A LoRA adapter loaded for one model.")
        .def(nb::init<const Model &, const std::string &>(), "model"_a, "path"_a,
             nb::call_guard<nb::gil_scoped_release>(),
             "Load the adapter at ``path``. Raises ModelLoadError if it is missing or does not fit the model.")
        .def_prop_ro("path", &LoraAdapter::path)
        .def(
            "__eq__",
            [](const LoraAdapter &a, nb::handle other) -> nb::object {
                if (!nb::isinstance<LoraAdapter>(other)) {
                    return nb::borrow(Py_NotImplemented);
                }
                return nb::bool_(a.data() == nb::cast<const LoraAdapter &>(other).data());
            },
            nb::sig("def __eq__(self, other: object, /) -> bool"))
        .def("__hash__", [](const LoraAdapter &a) { return std::hash<const void *>()(a.data().get()); })
        .def("__repr__", [](const LoraAdapter &a) { return "<LoraAdapter '" + a.path() + "'>"; });

    nb::class_<Model>(m, "Model", "A GGUF model loaded by llama.cpp.")
        .def(
            "__init__",
            [](Model *self, const std::string &path, const ModelOptions &options) {
                std::optional<LoadProgress> progress;
                if (!options.progress_callback.is_none()) {
                    progress.emplace(options.progress_callback);
                }
                try {
                    nb::gil_scoped_release release;
                    new (self) Model(path, options, progress ? &*progress : nullptr);
                } catch (const ModelLoadError &e) {
                    if (!progress || !progress->raised()) {
                        throw;
                    }
                    // The callback's own exception, as the cause of the load error; an
                    // interrupt (Ctrl-C in the callback) propagates as it is.
                    const bool interrupted = progress->interrupted();
                    progress->restore();
                    if (!interrupted) {
                        nb::chain_error(py_model_load_error, "%s", e.what());
                    }
                    throw nb::python_error();
                }
            },
            "path"_a, "options"_a,
            "Load ``path`` (the GIL released, except inside ``options.progress_callback``).\n\n"
            "Raises ModelLoadError if it is missing or not a loadable GGUF, or if the progress "
            "callback returned False or raised (its exception is the cause); an interrupt "
            "raised in the callback (KeyboardInterrupt) propagates unchanged.")
        .def("close", &Model::close, nb::call_guard<nb::gil_scoped_release>(),
             "Drop this object's reference to the weights (idempotent).")
        .def_prop_ro("closed", &Model::closed)
        .def_prop_ro("path", &Model::path)
        .def(
            "tokenize",
            [](const Model &self, nb::bytes text, bool add_special, bool parse_special) {
                std::string data(text.c_str(), text.size());
                nb::gil_scoped_release release;
                return self.tokenize(data, add_special, parse_special);
            },
            "text"_a, "add_special"_a, "parse_special"_a,
            "Token ids of the UTF-8 bytes ``text``.")
        .def(
            "detokenize",
            [](const Model &self, const std::vector<llama_token> &tokens, bool special) {
                std::string out;
                {
                    nb::gil_scoped_release release;
                    out = self.detokenize(tokens, special);
                }
                return nb::bytes(out.data(), out.size());
            },
            "tokens"_a, "special"_a)
        .def(
            "token_to_piece",
            [](const Model &self, llama_token token, bool special) {
                std::string piece = self.token_to_piece(token, special);
                return nb::bytes(piece.data(), piece.size());
            },
            "token"_a, "special"_a)
        .def("metadata", &Model::metadata, "GGUF key/value metadata, values rendered as text.")
        .def("description", &Model::description)
        .def("chat_template", &Model::chat_template)
        .def("is_eog",
             [](const Model &self, llama_token t) {
                 return with_model(self, [t](auto *, const llama_vocab *vocab) {
                     Model::check_token(vocab, t);
                     return llama_vocab_is_eog(vocab, t);
                 });
             })
        .def_prop_ro("n_vocab",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_n_tokens(vocab); });
                     })
        .def_prop_ro("n_ctx_train",
                     [](const Model &s) {
                         return with_model(s, [](auto *mdl, auto *) {
                             return llama_model_n_ctx_train(mdl);
                         });
                     })
        .def_prop_ro("n_embd",
                     [](const Model &s) {
                         return with_model(s, [](auto *mdl, auto *) { return llama_model_n_embd(mdl); });
                     })
        .def_prop_ro("n_layer",
                     [](const Model &s) {
                         return with_model(s, [](auto *mdl, auto *) { return llama_model_n_layer(mdl); });
                     })
        .def_prop_ro("n_params",
                     [](const Model &s) {
                         return with_model(s, [](auto *mdl, auto *) { return llama_model_n_params(mdl); });
                     })
        .def_prop_ro("size",
                     [](const Model &s) {
                         return with_model(s, [](auto *mdl, auto *) { return llama_model_size(mdl); });
                     })
        .def_prop_ro("token_bos",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_bos(vocab); });
                     })
        .def_prop_ro("token_eos",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_eos(vocab); });
                     })
        // Fill-in-the-middle tokens, -1 (LLAMA_TOKEN_NULL) where the model has none
        // (llama_cpp/fim.py builds the infill prompt from them).
        .def_prop_ro("token_fim_pre",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_pre(vocab); });
                     })
        .def_prop_ro("token_fim_suf",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_suf(vocab); });
                     })
        .def_prop_ro("token_fim_mid",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_mid(vocab); });
                     })
        .def_prop_ro("token_fim_pad",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_pad(vocab); });
                     })
        .def_prop_ro("token_fim_rep",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_rep(vocab); });
                     })
        .def_prop_ro("token_fim_sep",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_fim_sep(vocab); });
                     })
        .def_prop_ro("add_bos",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_get_add_bos(vocab); });
                     })
        .def_prop_ro("add_eos",
                     [](const Model &s) {
                         return with_model(s, [](auto *, auto *vocab) { return llama_vocab_get_add_eos(vocab); });
                     })
        .def("__repr__", [](const Model &s) {
            try {
                return "<Model '" + s.path() + "' " + s.description() + ", " +
                       format_size(with_model(s, [](auto *mdl, auto *) { return llama_model_size(mdl); })) + ">";
            } catch (const ClosedError &) {  // closed before or during this call
                return "<Model '" + s.path() + "' (closed)>";
            }
        });
}

// =====================================================================================
// Sampling
// =====================================================================================

struct SamplerDeleter {
    void operator()(llama_sampler *s) const { llama_sampler_free(s); }
};
using SamplerPtr = std::unique_ptr<llama_sampler, SamplerDeleter>;

// Deepest nesting of parentheses in a GBNF grammar, and of arrays and objects in a JSON
// schema, that reaches llama.cpp: its grammar parser, JSON parser and schema converter recurse
// once (or more) per level and overflow the stack, killing the process, from about 20000
// levels on. Real grammars and schemas nest a few dozen levels.
constexpr size_t MAX_GRAMMAR_NESTING = 1000;
// Most alternatives a rule or parenthesized group may start with, counting those of groups
// that open an alternative (`(a | b) | c` starts with 3). llama.cpp's grammar keeps a stack
// per alternative it may be in and compares each new stack with all the others: compiling
// (and each sampling step into) n of them costs n^2, 0.3 s for 20,000 here, 10 s for 100,000,
// and a million would be a hang. json_schema.py writes a large enum as a prefix tree, whose
// groups start with as many alternatives as there are distinct next characters. Alternatives
// reached through a rule reference (`root ::= r0 | r1`) are not counted.
constexpr size_t MAX_GRAMMAR_ALTERNATIVES = 20000;
constexpr size_t MAX_SCHEMA_NESTING = 512;

// What in the GBNF `grammar` would hang or crash llama.cpp's parser, described, or "":
// - a repetition `{m,n}` with n < m: handle_repetitions counts the optional copies as n - m in
//   uint64_t, which wraps around, and appends rules until memory runs out;
// - parentheses nested deeper than MAX_GRAMMAR_NESTING (a stack overflow);
// - a NUL character (the parser stops there: the rest would be ignored, not refused).
// String literals, character classes and comments are skipped, as the parser reads them; a
// count too long for uint64_t saturates (the parser rejects it as too large).
std::string grammar_hazard(const std::string &grammar) {
    const size_t size = grammar.size();
    size_t depth = 0;
    auto line_at = [&](size_t offset) {
        return std::to_string(1 + std::count(grammar.begin(), grammar.begin() + static_cast<std::ptrdiff_t>(offset), '\n'));
    };
    // llama.cpp reads the grammar as a C string: it would silently ignore all after a NUL.
    if (const size_t nul = grammar.find('\0'); nul != std::string::npos) {
        return "the grammar contains a NUL character, at line " + line_at(nul);
    }
    auto skip_space = [&](size_t i) {
        while (i < size && (grammar[i] == ' ' || grammar[i] == '\t' || grammar[i] == '\r' || grammar[i] == '\n')) ++i;
        return i;
    };
    auto read_count = [&](size_t &i, uint64_t &value) {
        const size_t start = i;
        value = 0;
        for (; i < size && grammar[i] >= '0' && grammar[i] <= '9'; ++i) {
            const uint64_t digit = static_cast<uint64_t>(grammar[i] - '0');
            value = value > (UINT64_MAX - digit) / 10 ? UINT64_MAX : value * 10 + digit;
        }
        return i > start;
    };
    // The rule, then each open group: alternatives it starts with so far, what the current
    // alternative starts with (0: nothing yet), and whether the group opened an alternative
    // of its parent.
    struct Group {
        size_t starts = 0;
        size_t first = 0;
        bool opens_parent = false;
    };
    std::vector<Group> groups(1);
    auto element = [&](size_t fan_out) {
        if (groups.back().first == 0) groups.back().first = fan_out;
    };
    auto close_alternative = [&](size_t at) -> std::string {
        Group &group = groups.back();
        // An empty alternative starts with 1; an unclosed group's SIZE_MAX is capped, not wrapped.
        group.starts += std::clamp<size_t>(group.first, 1, MAX_GRAMMAR_ALTERNATIVES + 1);
        group.first = 0;
        if (group.starts > MAX_GRAMMAR_ALTERNATIVES) {
            return "a rule or group that starts with more than " + std::to_string(MAX_GRAMMAR_ALTERNATIVES) +
                   " alternatives, at line " + line_at(at);
        }
        return "";
    };
    for (size_t i = 0; i < size;) {
        const char c = grammar[i];
        if (c == '|') {
            if (std::string reason = close_alternative(i); !reason.empty()) return reason;
            ++i;
        } else if (c == ':' && grammar.compare(i, 3, "::=") == 0) {
            // A new rule: the last one ends (its name, already read, counts for nothing).
            if (std::string reason = close_alternative(i); !reason.empty()) return reason;
            groups.assign(1, Group{});
            i += 3;
        } else if (c == '"' || c == '[') {
            element(1);
            const char close = c == '"' ? '"' : ']';
            for (++i; i < size && grammar[i] != close; ++i) {
                if (grammar[i] == '\\') ++i;  // an escape: the next character is literal
            }
            ++i;
        } else if (c == '#') {
            while (i < size && grammar[i] != '\r' && grammar[i] != '\n') ++i;
        } else if (c == '{') {
            const size_t open = i;
            uint64_t min_times = 0, max_times = 0;
            i = skip_space(i + 1);
            if (!read_count(i, min_times)) continue;
            i = skip_space(i);
            if (i >= size || grammar[i] != ',') continue;
            i = skip_space(i + 1);
            if (!read_count(i, max_times)) continue;
            if (max_times < min_times) {
                return "repetition {" + std::to_string(min_times) + "," + std::to_string(max_times) +
                       "} has its maximum below its minimum, at line " + line_at(open);
            }
        } else if (c == '(') {
            if (++depth > MAX_GRAMMAR_NESTING) {
                return "parentheses nested deeper than " + std::to_string(MAX_GRAMMAR_NESTING) + " levels, at line " +
                       line_at(i);
            }
            const bool opens = groups.back().first == 0;
            element(SIZE_MAX);  // the parent's alternative starts with this group (set at ')')
            groups.push_back(Group{0, 0, opens});
            ++i;
        } else {
            if (c == ')' && depth > 0) {
                --depth;
            }
            if (c == ')' && groups.size() > 1) {
                if (std::string reason = close_alternative(i); !reason.empty()) return reason;
                const Group closed = groups.back();
                groups.pop_back();
                if (closed.opens_parent) groups.back().first = closed.starts;
            } else if (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') {
                element(1);  // a rule name, or any character (.)
            }
            ++i;
        }
    }
    return close_alternative(size);
}

// Throws GrammarError if the JSON text `schema` nests arrays and objects deeper than
// MAX_SCHEMA_NESTING (see there); strings are skipped. Malformed JSON is left to the parser.
void check_schema_nesting(const std::string &schema) {
    size_t depth = 0;
    for (size_t i = 0; i < schema.size(); ++i) {
        const char c = schema[i];
        if (c == '"') {
            for (++i; i < schema.size() && schema[i] != '"'; ++i) {
                if (schema[i] == '\\') ++i;
            }
        } else if (c == '[' || c == '{') {
            if (++depth > MAX_SCHEMA_NESTING) {
                throw GrammarError("invalid JSON schema: arrays and objects nested deeper than " +
                                   std::to_string(MAX_SCHEMA_NESTING) + " levels");
            }
        } else if ((c == ']' || c == '}') && depth > 0) {
            --depth;
        }
    }
}

// Why llama.cpp's grammar parser rejects the GBNF `grammar`, or "" if it parses. `vocab` may
// be null (no model at hand): a token literal such as <end_of_turn> then cannot be resolved,
// and the text is reported as parsing, with *needs_vocab set (the model checks it when a
// generation starts).
//
// llama_grammar_parser::parse catches its parse error and prints it to stderr; its parse_rule,
// which throws it, is called here rule by rule instead, and the reason becomes the message.
std::string grammar_syntax_error(const llama_vocab *vocab, const std::string &grammar, bool *needs_vocab = nullptr) {
    if (std::string reason = grammar_hazard(grammar); !reason.empty()) {
        return reason;
    }
#ifdef LLAMA_CPP_GRAMMAR_PARSER
    // Blanks and comments between rules, as the parser skips them before the first rule (it
    // skips them itself after each).
    auto skip_blank = [](const char *pos) {
        while (*pos == ' ' || *pos == '\t' || *pos == '\r' || *pos == '\n' || *pos == '#') {
            if (*pos == '#') {
                while (*pos != '\0' && *pos != '\r' && *pos != '\n') ++pos;
            } else {
                ++pos;
            }
        }
        return pos;
    };
    llama_grammar_parser parser(vocab);
    try {
        const char *pos = skip_blank(grammar.c_str());
        while (*pos != '\0') {
            pos = parser.parse_rule(pos);
        }
    } catch (const std::exception &e) {
        std::string reason = e.what();
        if (vocab == nullptr && reason.rfind("no vocab to parse token", 0) == 0) {
            if (needs_vocab != nullptr) *needs_vocab = true;
            return "";
        }
        // The parser's reasons end in "at <the rest of the grammar>": say where instead.
        const size_t at = reason.find(" at ");
        if (at != std::string::npos) {
            const std::string rest = reason.substr(at + 4);
            if (rest.size() <= grammar.size() && grammar.compare(grammar.size() - rest.size(), rest.size(), rest) == 0) {
                const size_t offset = grammar.size() - rest.size();
                const size_t line = 1 + static_cast<size_t>(std::count(grammar.begin(), grammar.begin() + offset, '\n'));
                const size_t line_start = grammar.rfind('\n', offset == 0 ? 0 : offset - 1);
                const size_t column = offset - (line_start == std::string::npos || offset == 0 ? 0 : line_start + 1) + 1;
                const std::string near = rest.substr(0, std::min<size_t>(rest.find('\n'), 20));
                reason = reason.substr(0, at) + " at line " + std::to_string(line) + ", column " +
                         std::to_string(column) + (near.empty() ? " (the end)" : ": '" + near + "'");
            }
        }
        return reason;
    }
    for (const auto &[name, id] : parser.symbol_ids) {
        if (id >= parser.rules.size() || parser.rules[id].empty()) {
            return "undefined rule '" + name + "'";
        }
    }
    if (parser.rules.empty()) {
        return "the grammar has no rules";
    }
#else
    (void)vocab;
    (void)grammar;
    (void)needs_vocab;
#endif
    return "";
}

// Parses a GBNF grammar into a sampler; a grammar llama.cpp rejects raises GrammarError with
// its reason: the parser's (above), or what llama.cpp logged on this thread (no root rule,
// left recursion).
llama_sampler *parse_grammar(const llama_vocab *vocab, const std::string &grammar, const std::string &root) {
    if (const std::string reason = grammar_syntax_error(vocab, grammar); !reason.empty()) {
        throw GrammarError("invalid grammar: " + reason);
    }
    tl_last_errors.clear();
    llama_sampler *s = llama_sampler_init_grammar(vocab, grammar.c_str(), root.c_str());
    if (s == nullptr) {
        throw GrammarError("invalid grammar: " + last_errors_or("parse error"));
    }
    return s;
}

llama_sampler *parse_lazy_grammar(const llama_vocab *vocab, const std::string &grammar, const std::string &root,
                                  const std::vector<std::string> &patterns, const std::vector<llama_token> &tokens) {
    if (const std::string reason = grammar_syntax_error(vocab, grammar); !reason.empty()) {
        throw GrammarError("invalid grammar: " + reason);
    }
    tl_last_errors.clear();
    std::vector<const char *> c_patterns;
    c_patterns.reserve(patterns.size());
    for (const std::string &p : patterns) {
        c_patterns.push_back(p.c_str());
    }
    llama_sampler *s = nullptr;
    try {
        s = llama_sampler_init_grammar_lazy_patterns(vocab, grammar.c_str(), root.c_str(), c_patterns.data(),
                                                     c_patterns.size(), tokens.data(), tokens.size());
    } catch (const std::exception &e) {  // an invalid trigger regex
        throw GrammarError(std::string("invalid grammar trigger: ") + e.what());
    }
    if (s == nullptr) {
        throw GrammarError("invalid grammar: " + last_errors_or("parse error"));
    }
    return s;
}

// Raises GrammarError (with the reason) if llama.cpp would reject `grammar` whatever the
// vocabulary: its syntax, undefined rules, a missing root rule, left recursion. Needs no model.
void validate_grammar(const std::string &grammar, const std::string &root) {
    bool needs_vocab = false;
    if (const std::string reason = grammar_syntax_error(nullptr, grammar, &needs_vocab); !reason.empty()) {
        throw GrammarError("invalid grammar: " + reason);
    }
#ifdef LLAMA_CPP_GRAMMAR_PARSER
    if (needs_vocab) {
        return;  // token literals: llama.cpp's parser would fail (and print to stderr) without one
    }
    // llama.cpp's other checks run when it builds a grammar; their reasons go to the log.
    tl_last_errors.clear();
    llama_grammar *g = llama_grammar_init_impl(nullptr, grammar.c_str(), root.c_str(), false, nullptr, 0, nullptr, 0);
    if (g == nullptr) {
        throw GrammarError("invalid grammar: " + last_errors_or("parse error"));
    }
    llama_grammar_free_impl(g);
#else
    (void)root;
#endif
}

// llama.cpp's grammar sampler, with its failures raised as GrammarError. It throws a bare
// std::runtime_error ("Unexpected empty grammar stack after accepting piece ...") when asked
// to accept a token it does not allow, which happens when every token it allows was masked
// out (a logit bias against end of generation once the grammar is complete, say).
struct GrammarGuard {
    llama_sampler *grammar;  // owned
};

llama_sampler *guard_grammar(llama_sampler *grammar);

template <typename F>
void as_grammar_error(F &&f) {
    try {
        f();
    } catch (const LlamaError &) {
        throw;
    } catch (const std::runtime_error &e) {
        throw GrammarError(std::string("the grammar cannot continue: ") + e.what());
    }
}

llama_sampler_i make_grammar_guard_iface() {
    llama_sampler_i iface{};  // no backend sampling: llama.cpp's grammar sampler has none either
    iface.name = [](const llama_sampler *) { return "grammar"; };  // accept_prompt looks for it
    iface.accept = [](llama_sampler *s, llama_token token) {
        as_grammar_error([&] { llama_sampler_accept(static_cast<GrammarGuard *>(s->ctx)->grammar, token); });
    };
    iface.apply = [](llama_sampler *s, llama_token_data_array *cur_p) {
        as_grammar_error([&] { llama_sampler_apply(static_cast<GrammarGuard *>(s->ctx)->grammar, cur_p); });
    };
    iface.reset = [](llama_sampler *s) { llama_sampler_reset(static_cast<GrammarGuard *>(s->ctx)->grammar); };
    iface.clone = [](const llama_sampler *s) {
        return guard_grammar(llama_sampler_clone(static_cast<const GrammarGuard *>(s->ctx)->grammar));
    };
    iface.free = [](llama_sampler *s) {
        auto *guard = static_cast<GrammarGuard *>(s->ctx);
        llama_sampler_free(guard->grammar);
        delete guard;
    };
    return iface;
}

llama_sampler_i grammar_guard_iface = make_grammar_guard_iface();

// Takes ownership of `grammar`.
llama_sampler *guard_grammar(llama_sampler *grammar) {
    return llama_sampler_init(&grammar_guard_iface, new GrammarGuard{grammar});
}

// The sampling settings of one generation. The chain is built in llama-server's order:
// logit bias, penalties, DRY, then greedy (temperature == 0), plain random (temperature < 0),
// mirostat, or top-n-sigma -> top-k -> typical -> top-p -> min-p -> XTC -> temperature ->
// distribution. DRY, XTC and top-n-sigma are off by default (llama-server's defaults).
struct SamplerConfig {
    float temperature = 0.8f;
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float typical_p = 1.0f;
    float repeat_penalty = 1.0f;
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    int32_t penalty_last_n = 64;
    int32_t mirostat_mode = 0;
    float mirostat_tau = 5.0f;
    float mirostat_eta = 0.1f;
    // DRY ("don't repeat yourself"): a token that would extend a repetition longer than
    // dry_allowed_length tokens loses dry_multiplier * dry_base^(length - allowed) logits.
    float dry_multiplier = 0.0f;  // 0 disables it
    float dry_base = 1.75f;
    int32_t dry_allowed_length = 2;
    int32_t dry_penalty_last_n = 64;  // tokens scanned (-1: the context, 0 disables it)
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};
    // XTC ("exclude top choices"): with probability xtc_probability, drop every token above
    // xtc_threshold except the least likely of them.
    float xtc_probability = 0.0f;  // 0 disables it
    float xtc_threshold = 0.1f;
    float top_n_sigma = -1.0f;  // keep logits within n standard deviations of the top; <= 0 disables it
    uint32_t seed = LLAMA_DEFAULT_SEED;
    std::vector<std::pair<llama_token, float>> logit_bias;
    std::string grammar;  // GBNF; empty: unconstrained
    std::string grammar_root = "root";
    // A lazy grammar constrains nothing until the generated text matches one of the trigger
    // patterns (regexes; the match and what follows are constrained) or a trigger token is
    // sampled: how tool calls are enforced without forcing one (llama-server's tool grammars).
    bool grammar_lazy = false;
    std::vector<std::string> grammar_trigger_patterns;
    std::vector<llama_token> grammar_trigger_tokens;
    // Tokens the grammar accepts before the first generated one: a chat template's generation
    // prompt when the grammar (from the template) starts with it.
    std::vector<llama_token> grammar_prefill;

    void validate(int32_t n_vocab) const {
        auto fail = [](const std::string &what) { throw InvalidArgumentError(what); };
        if (!(temperature == temperature)) fail("temperature must be a number, got NaN");
        if (top_k < 0) fail("top_k must be >= 0 (0 disables it), got " + std::to_string(top_k));
        if (!(top_p >= 0.0f && top_p <= 1.0f)) fail("top_p must be in [0, 1], got " + std::to_string(top_p));
        if (!(min_p >= 0.0f && min_p <= 1.0f)) fail("min_p must be in [0, 1], got " + std::to_string(min_p));
        if (!(typical_p >= 0.0f && typical_p <= 1.0f))
            fail("typical_p must be in [0, 1], got " + std::to_string(typical_p));
        if (!(repeat_penalty > 0.0f))
            fail("repeat_penalty must be > 0 (1.0 disables it), got " + std::to_string(repeat_penalty));
        if (!std::isfinite(frequency_penalty)) fail("frequency_penalty must be finite");
        if (!std::isfinite(presence_penalty)) fail("presence_penalty must be finite");
        if (penalty_last_n < -1) fail("penalty_last_n must be >= -1");
        if (mirostat_mode < 0 || mirostat_mode > 2)
            fail("mirostat_mode must be 0, 1 or 2, got " + std::to_string(mirostat_mode));
        if (!(mirostat_tau >= 0.0f)) fail("mirostat_tau must be >= 0");
        if (!(mirostat_eta >= 0.0f)) fail("mirostat_eta must be >= 0");
        if (!(std::isfinite(dry_multiplier) && dry_multiplier >= 0.0f))
            fail("dry_multiplier must be finite and >= 0 (0 disables DRY), got " + std::to_string(dry_multiplier));
        if (!(std::isfinite(dry_base) && dry_base >= 1.0f))
            fail("dry_base must be finite and >= 1, got " + std::to_string(dry_base));
        if (dry_allowed_length < 0)
            fail("dry_allowed_length must be >= 0, got " + std::to_string(dry_allowed_length));
        if (dry_penalty_last_n < -1)
            fail("dry_penalty_last_n must be >= -1, got " + std::to_string(dry_penalty_last_n));
        if (!(xtc_probability >= 0.0f && xtc_probability <= 1.0f))
            fail("xtc_probability must be in [0, 1], got " + std::to_string(xtc_probability));
        if (!(xtc_threshold >= 0.0f && xtc_threshold <= 1.0f))
            fail("xtc_threshold must be in [0, 1], got " + std::to_string(xtc_threshold));
        if (!std::isfinite(top_n_sigma)) fail("top_n_sigma must be finite (<= 0 disables it)");
        for (const auto &[token, bias] : logit_bias) {
            if (token < 0 || token >= n_vocab)
                fail("logit_bias token id " + std::to_string(token) + " is out of range [0, " +
                     std::to_string(n_vocab) + ")");
            if (bias != bias) fail("logit_bias values must be numbers, got NaN");
        }
    }

    // Plain greedy decoding needs no sampler chain: an argmax over the logits is what the
    // chain would compute, without copying n_vocab candidates per token (3 MiB for Gemma 3).
    bool plain_greedy() const {
        return temperature == 0.0f && logit_bias.empty() && grammar.empty() && repeat_penalty == 1.0f &&
               frequency_penalty == 0.0f && presence_penalty == 0.0f && !dry_enabled();
    }

    bool dry_enabled() const {
        return dry_multiplier > 0.0f && dry_base >= 1.0f && dry_penalty_last_n != 0;
    }

    // The grammar's sampler, apart from the chain (null without a grammar): a fresh grammar
    // state for every generation. SequenceDecoder checks the chain's pick against it and only
    // constrains all candidates when the pick is rejected, as llama-server does.
    SamplerPtr build_grammar(const llama_model *model) const {
        if (grammar.empty()) return nullptr;
        const llama_vocab *vocab = llama_model_get_vocab(model);
        SamplerPtr g(grammar_lazy ? parse_lazy_grammar(vocab, grammar, grammar_root, grammar_trigger_patterns,
                                                       grammar_trigger_tokens)
                                  : parse_grammar(vocab, grammar, grammar_root));
        try {
            for (llama_token t : grammar_prefill) {
                llama_sampler_accept(g.get(), t);
            }
        } catch (const std::exception &e) {
            throw GrammarError(std::string("the grammar rejects the chat template's generation prompt: ") + e.what());
        }
        return SamplerPtr(guard_grammar(g.release()));
    }

    // The chain without the grammar (see build_grammar), in llama-server's order.
    SamplerPtr build(const llama_model *model, int32_t n_ctx) const {
        const llama_vocab *vocab = llama_model_get_vocab(model);
        const int32_t n_vocab = llama_vocab_n_tokens(vocab);
        validate(n_vocab);
        llama_sampler_chain_params chain_params = llama_sampler_chain_default_params();
        chain_params.no_perf = false;
        SamplerPtr chain(llama_sampler_chain_init(chain_params));
        auto add = [&](llama_sampler *s) {
            if (s == nullptr) {
                throw LlamaError("failed to create a sampler");
            }
            llama_sampler_chain_add(chain.get(), s);
        };
        if (!logit_bias.empty()) {
            std::vector<llama_logit_bias> biases;
            biases.reserve(logit_bias.size());
            for (const auto &[token, bias] : logit_bias) {
                biases.push_back({token, bias});
            }
            add(llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(biases.size()),
                                              biases.data()));
        }
        if (repeat_penalty != 1.0f || frequency_penalty != 0.0f || presence_penalty != 0.0f) {
            add(llama_sampler_init_penalties(n_vocab, penalty_last_n == -1 ? n_ctx : penalty_last_n,
                                             repeat_penalty, frequency_penalty, presence_penalty));
        }
        if (dry_enabled()) {
            std::vector<const char *> breakers;
            breakers.reserve(dry_sequence_breakers.size());
            for (const std::string &b : dry_sequence_breakers) {
                breakers.push_back(b.c_str());
            }
            add(llama_sampler_init_dry(vocab, dry_multiplier, dry_base, dry_allowed_length,
                                       dry_penalty_last_n == -1 ? n_ctx : dry_penalty_last_n, breakers.data(),
                                       breakers.size()));
        }
        if (temperature == 0.0f) {
            add(llama_sampler_init_greedy());
        } else if (temperature < 0.0f) {
            add(llama_sampler_init_dist(seed));
        } else if (mirostat_mode == 1) {
            add(llama_sampler_init_temp(temperature));
            add(llama_sampler_init_mirostat(n_vocab, seed, mirostat_tau, mirostat_eta, 100));
        } else if (mirostat_mode == 2) {
            add(llama_sampler_init_temp(temperature));
            add(llama_sampler_init_mirostat_v2(seed, mirostat_tau, mirostat_eta));
        } else {
            if (top_n_sigma > 0.0f) add(llama_sampler_init_top_n_sigma(top_n_sigma));
            if (top_k > 0) add(llama_sampler_init_top_k(top_k));
            if (typical_p < 1.0f) add(llama_sampler_init_typical(typical_p, 1));
            if (top_p < 1.0f) add(llama_sampler_init_top_p(top_p, 1));
            if (min_p > 0.0f) add(llama_sampler_init_min_p(min_p, 1));
            if (xtc_probability > 0.0f) add(llama_sampler_init_xtc(xtc_probability, xtc_threshold, 1, seed));
            add(llama_sampler_init_temp(temperature));
            add(llama_sampler_init_dist(seed));
        }
        return chain;
    }
};

// Feeds the prompt to a chain's samplers: penalties see the prompt, as in llama-server; the
// grammar does not (it constrains the generated text only).
void accept_prompt(llama_sampler *chain, const std::vector<llama_token> &prompt) {
    for (int32_t i = 0; i < llama_sampler_chain_n(chain); ++i) {
        llama_sampler *sampler = llama_sampler_chain_get(chain, i);
        if (std::string_view(llama_sampler_name(sampler)) == "grammar") {
            continue;
        }
        for (llama_token t : prompt) {
            llama_sampler_accept(sampler, t);
        }
    }
}

void bind_sampling(nb::module_ &m) {
    nb::class_<SamplerConfig>(m, "SamplerConfig",
                              "Sampling settings of one generation (see llama_cpp.SamplingParams).")
        .def(nb::init<>())
        .def_rw("temperature", &SamplerConfig::temperature)
        .def_rw("top_k", &SamplerConfig::top_k)
        .def_rw("top_p", &SamplerConfig::top_p)
        .def_rw("min_p", &SamplerConfig::min_p)
        .def_rw("typical_p", &SamplerConfig::typical_p)
        .def_rw("repeat_penalty", &SamplerConfig::repeat_penalty)
        .def_rw("frequency_penalty", &SamplerConfig::frequency_penalty)
        .def_rw("presence_penalty", &SamplerConfig::presence_penalty)
        .def_rw("penalty_last_n", &SamplerConfig::penalty_last_n)
        .def_rw("mirostat_mode", &SamplerConfig::mirostat_mode)
        .def_rw("mirostat_tau", &SamplerConfig::mirostat_tau)
        .def_rw("mirostat_eta", &SamplerConfig::mirostat_eta)
        .def_rw("dry_multiplier", &SamplerConfig::dry_multiplier)
        .def_rw("dry_base", &SamplerConfig::dry_base)
        .def_rw("dry_allowed_length", &SamplerConfig::dry_allowed_length)
        .def_rw("dry_penalty_last_n", &SamplerConfig::dry_penalty_last_n)
        .def_rw("dry_sequence_breakers", &SamplerConfig::dry_sequence_breakers)
        .def_rw("xtc_probability", &SamplerConfig::xtc_probability)
        .def_rw("xtc_threshold", &SamplerConfig::xtc_threshold)
        .def_rw("top_n_sigma", &SamplerConfig::top_n_sigma)
        .def_rw("seed", &SamplerConfig::seed)
        .def_rw("logit_bias", &SamplerConfig::logit_bias)
        .def_rw("grammar", &SamplerConfig::grammar)
        .def_rw("grammar_root", &SamplerConfig::grammar_root)
        .def_rw("grammar_lazy", &SamplerConfig::grammar_lazy)
        .def_rw("grammar_trigger_patterns", &SamplerConfig::grammar_trigger_patterns)
        .def_rw("grammar_trigger_tokens", &SamplerConfig::grammar_trigger_tokens)
        .def_rw("grammar_prefill", &SamplerConfig::grammar_prefill);
    m.def(
        "json_schema_to_grammar",
        [](const std::string &schema) {
            check_schema_nesting(schema);
            try {
                return json_schema_to_grammar(common_json::parse(schema));
            } catch (const std::exception &e) {
                throw GrammarError(std::string("invalid JSON schema: ") + e.what());
            }
        },
        "schema"_a, nb::call_guard<nb::gil_scoped_release>(),
        "GBNF that accepts exactly the JSON documents valid under ``schema`` (JSON text), by "
        "llama.cpp's own converter. Raises GrammarError for a schema it cannot convert.");
    m.def(
        "check_grammar",
        [](const Model &model, const std::string &grammar, const std::string &root) {
            // Runs with the GIL released: the handle keeps the vocabulary alive for the whole
            // parse, whatever close() another thread calls meanwhile.
            ModelHandle keep = model.handle();
            llama_sampler_free(parse_grammar(llama_model_get_vocab(keep.get()), grammar, root));
        },
        "model"_a, "grammar"_a, "root"_a, nb::call_guard<nb::gil_scoped_release>(),
        "Raise GrammarError if llama.cpp rejects ``grammar`` for this model's vocabulary.");
    m.def("validate_grammar", &validate_grammar, "grammar"_a, "root"_a, nb::call_guard<nb::gil_scoped_release>(),
          "Raise GrammarError, with llama.cpp's reason, if it would reject ``grammar`` whatever the "
          "model (its syntax, undefined rules, no ``root`` rule, left recursion). Token literals "
          "(``<end_of_turn>``) are checked against a model's vocabulary only (check_grammar).");
    m.attr("DEFAULT_SEED") = static_cast<uint32_t>(LLAMA_DEFAULT_SEED);
}

// =====================================================================================
// Chat: llama.cpp's chat templates and output parsers
// =====================================================================================
//
// The code llama-server uses (common/chat.h): the model's Jinja template rendered by
// llama.cpp's own engine, with a format per model family. Rendering gives the prompt and
// what its generation needs (a grammar with lazy triggers for tool calls or a schema, special
// tokens to keep as text, extra stops); the format's parser turns the generated text back
// into content, reasoning_content and tool_calls. Messages, tools and parsed messages cross
// the boundary as JSON text, in OpenAI's shapes.

// One rendering request (what llama-server reads from a chat completion body).
struct ChatRequest {
    std::string messages = "[]";       // OpenAI messages (JSON array)
    std::string tools;                 // OpenAI tools (JSON array); empty: none
    std::string tool_choice = "auto";  // auto | none | required
    std::string json_schema;           // constrain the answer to this schema; empty: free text
    bool parallel_tool_calls = false;
    bool add_generation_prompt = true;
    bool enable_thinking = true;
    std::string reasoning_format = "auto";  // none | auto | deepseek | deepseek-legacy
    std::vector<std::pair<std::string, std::string>> template_kwargs;  // name -> JSON value
};

// A rendered conversation: the prompt and what its generation and parsing need.
struct ChatParams {
    std::string prompt;
    std::string format;  // the format's name, e.g. "peg-native"
    std::string grammar;
    bool grammar_lazy = false;
    std::vector<std::string> grammar_trigger_patterns;
    std::vector<llama_token> grammar_trigger_tokens;
    std::vector<llama_token> grammar_prefill;
    std::vector<llama_token> preserved_tokens;
    std::vector<std::string> additional_stops;
    std::string generation_prompt;
    bool supports_thinking = false;
    std::string thinking_start_tag;
    std::vector<std::string> thinking_end_tags;
    std::shared_ptr<const common_chat_parser_params> parser;  // immutable once built
};

// One entry of a streamed message's changes (common_chat_msg_diff).
struct ChatDelta {
    std::string content;
    std::string reasoning_content;
    int32_t tool_call_index = -1;  // -1: no tool call changed
    std::string tool_call_id;
    std::string tool_call_name;
    std::string tool_call_arguments;
};

// =====================================================================================
// Chat templates: static checks and a bounded render
// =====================================================================================
//
// A chat template comes from the GGUF's metadata, so from whoever made the file. llama.cpp's
// Jinja engine has no step counter, deadline or recursion limit, and `range()` is eager
// (range(10**8) builds 10**8 values, gigabytes), so a template can loop for hours, exhaust
// memory or overflow the stack (a self-recursive macro). We cannot change the engine, so:
//   1. before llama.cpp sees a template (its init already renders it, to detect capabilities),
//      we parse it with llama.cpp's own lexer and parser and refuse what is certainly abuse:
//      oversized source, brackets/blocks/an AST nested too deep, macros that always call
//      themselves (directly or mutually), constant range()s, loop products and string
//      repetitions past a limit;
//   2. recursion itself cannot be refused (12 of llama.cpp's 71 sample templates recurse over
//      tool schemas), so we rewrite the source: each macro body counts the depth of nested
//      macro calls in a namespace and raises past max_macro_depth; the output is unchanged;
//   3. every render (and llama.cpp's init) runs on a thread of its own with a stack sized for
//      that depth and a deadline, and its output is capped: past the deadline the caller gets
//      TemplateError and the templates are refused for good (the runaway thread cannot be
//      stopped; it runs on until the render ends, holding a core and what it allocated).
// The engine has no include/import/extends (the parser rejects them) and no file or network
// access; strftime_now reads the clock only.

// Refused or failed chat template: llama_cpp.errors.TemplateError (an InvalidArgumentError).
struct TemplateRefused : InvalidArgumentError {
    using InvalidArgumentError::InvalidArgumentError;
};
// A template that does not parse (also a TemplateError).
struct TemplateInvalid : TemplateRefused {
    using TemplateRefused::TemplateRefused;
};

// Static limits. Real templates are far below them: llama.cpp's models/templates/ are at most
// 17 KB and call range() on message counts only; each of them renders unchanged under these
// limits (tests/test_template_limits.py).
constexpr size_t kTemplateMaxSourceBytes = 1 << 20;
constexpr size_t kTemplateMaxAstDepth = 256;  // also bounds the stack the render needs
constexpr size_t kTemplateMaxLoopNesting = 8;
constexpr int64_t kTemplateMaxConstIterations = 100000;  // one constant range(), or a product
constexpr int64_t kTemplateMaxConstRepeat = 100000;      // 'x' * N
constexpr double kTemplateDefaultTimeLimit = 5.0;
constexpr size_t kTemplateDefaultMaxOutputBytes = 32u << 20;
// Macro calls nested in one another (recursion included): real templates recurse over tool
// schemas, a few levels deep.
constexpr size_t kTemplateDefaultMaxMacroDepth = 64;
constexpr size_t kTemplateMaxMacroDepth = 512;

// The render thread's stack. With the AST at most kTemplateMaxAstDepth deep, one macro call
// (its body, and a caller() body it runs) takes at most ~0.5 MiB of stack: measured, a macro
// 250 nodes deep overflows 64 MiB at between 64 and 300 nested calls. 1 MiB per allowed
// level, and 32 MiB for the rest; address space only, touched as used. max_macro_depth 0
// (no guard, for trusted templates) gets the most. Under AddressSanitizer every frame carries
// redzones: the same render needs several times the stack (scripts/build_sanitized.py).
#if defined(__has_feature)
#if __has_feature(address_sanitizer)  // clang's spelling
#define LLAMA_CPP_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(LLAMA_CPP_ASAN)
constexpr size_t kTemplateStackScale = 4;
#else
constexpr size_t kTemplateStackScale = 1;
#endif
size_t template_stack_bytes(size_t max_macro_depth) {
    const size_t levels = max_macro_depth == 0 ? kTemplateMaxMacroDepth : max_macro_depth;
    return kTemplateStackScale * ((32u << 20) + levels * (1u << 20));
}

// The children of an AST node, read from its fields (statement::visit skips those of literals).
std::vector<const jinja::statement *> template_children(const jinja::statement *node) {
    using namespace jinja;
    std::vector<const statement *> out;
    auto add = [&out](const statement_ptr &p) {
        if (p) out.push_back(p.get());
    };
    auto add_all = [&add](const statements &list) {
        for (const auto &p : list) add(p);
    };
    if (auto *n = dynamic_cast<const program *>(node)) {
        add_all(n->body);
    } else if (auto *n = dynamic_cast<const if_statement *>(node)) {
        add(n->test), add_all(n->body), add_all(n->alternate);
    } else if (auto *n = dynamic_cast<const for_statement *>(node)) {
        add(n->loopvar), add(n->iterable), add_all(n->body), add_all(n->default_block);
    } else if (auto *n = dynamic_cast<const set_statement *>(node)) {
        add(n->assignee), add(n->val), add_all(n->body);
    } else if (auto *n = dynamic_cast<const macro_statement *>(node)) {
        add(n->name), add_all(n->args), add_all(n->body);
    } else if (auto *n = dynamic_cast<const member_expression *>(node)) {
        add(n->object), add(n->property);
    } else if (auto *n = dynamic_cast<const call_expression *>(node)) {
        add(n->callee), add_all(n->args);
    } else if (auto *n = dynamic_cast<const array_literal *>(node)) {
        add_all(n->val);
    } else if (auto *n = dynamic_cast<const tuple_literal *>(node)) {
        add_all(n->val);
    } else if (auto *n = dynamic_cast<const object_literal *>(node)) {
        for (const auto &[key, value] : n->val) add(key), add(value);
    } else if (auto *n = dynamic_cast<const binary_expression *>(node)) {
        add(n->left), add(n->right);
    } else if (auto *n = dynamic_cast<const filter_expression *>(node)) {
        add(n->operand), add(n->filter);
    } else if (auto *n = dynamic_cast<const filter_statement *>(node)) {
        add(n->filter), add_all(n->body);
    } else if (auto *n = dynamic_cast<const select_expression *>(node)) {
        add(n->lhs), add(n->test);
    } else if (auto *n = dynamic_cast<const test_expression *>(node)) {
        add(n->operand), add(n->test);
    } else if (auto *n = dynamic_cast<const unary_expression *>(node)) {
        add(n->argument);
    } else if (auto *n = dynamic_cast<const slice_expression *>(node)) {
        add(n->start_expr), add(n->stop_expr), add(n->step_expr);
    } else if (auto *n = dynamic_cast<const keyword_argument_expression *>(node)) {
        add(n->key), add(n->val);
    } else if (auto *n = dynamic_cast<const spread_expression *>(node)) {
        add(n->argument);
    } else if (auto *n = dynamic_cast<const call_statement *>(node)) {
        add(n->call), add_all(n->caller_args), add_all(n->body);
    } else if (auto *n = dynamic_cast<const ternary_expression *>(node)) {
        add(n->condition), add(n->true_expr), add(n->false_expr);
    }
    return out;
}

const std::string *template_identifier(const jinja::statement *node) {
    auto *id = dynamic_cast<const jinja::identifier *>(node);
    return id ? &id->val : nullptr;
}

// Saturating integer arithmetic for constant folding: a product past int64 is "huge", not UB.
int64_t saturate(__int128 v) {
    constexpr int64_t hi = std::numeric_limits<int64_t>::max(), lo = std::numeric_limits<int64_t>::min();
    return v > hi ? hi : v < lo ? lo : static_cast<int64_t>(v);
}

// The value of a constant integer expression (literals, unary +/-, + - * // % **), if it is one.
std::optional<int64_t> template_const_int(const jinja::statement *node) {
    using namespace jinja;
    if (auto *n = dynamic_cast<const integer_literal *>(node)) return n->val;
    if (auto *n = dynamic_cast<const unary_expression *>(node)) {
        auto v = template_const_int(n->argument.get());
        if (!v) return std::nullopt;
        if (n->op.value == "-") return saturate(-static_cast<__int128>(*v));
        if (n->op.value == "+") return v;
        return std::nullopt;
    }
    if (auto *n = dynamic_cast<const binary_expression *>(node)) {
        auto a = template_const_int(n->left.get()), b = template_const_int(n->right.get());
        if (!a || !b) return std::nullopt;
        const __int128 x = *a, y = *b;
        const std::string &op = n->op.value;
        if (op == "+") return saturate(x + y);
        if (op == "-") return saturate(x - y);
        if (op == "*") return saturate(x * y);
        if ((op == "//" || op == "/") && y != 0) return saturate(x / y);
        if (op == "%" && y != 0) return saturate(x % y);
        if (op == "**" && y >= 0) {
            __int128 r = 1;
            for (__int128 i = 0; i < y && r <= std::numeric_limits<int64_t>::max() && r >= -r - 1; ++i) r *= x;
            return saturate(r);
        }
    }
    return std::nullopt;
}

// How many items a loop's iterable has when that is known statically: range() of constants
// or a literal list; nullopt otherwise.
std::optional<int64_t> template_const_length(const jinja::statement *node) {
    using namespace jinja;
    if (auto *n = dynamic_cast<const array_literal *>(node)) return static_cast<int64_t>(n->val.size());
    if (auto *n = dynamic_cast<const tuple_literal *>(node)) return static_cast<int64_t>(n->val.size());
    auto *call = dynamic_cast<const call_expression *>(node);
    const std::string *callee = call ? template_identifier(call->callee.get()) : nullptr;
    if (!callee || *callee != "range" || call->args.empty() || call->args.size() > 3) return std::nullopt;
    std::vector<int64_t> a;
    for (const auto &arg : call->args) {
        auto v = template_const_int(arg.get());
        if (!v) return std::nullopt;
        a.push_back(*v);
    }
    const __int128 start = a.size() == 1 ? 0 : a[0];
    const __int128 stop = a.size() == 1 ? a[0] : a[1];
    const __int128 step = a.size() == 3 ? a[2] : 1;
    if (step == 0) return 0;  // range() raises
    const __int128 n = step > 0 ? (stop - start + step - 1) / step : (start - stop - step - 1) / -step;
    return n < 0 ? 0 : saturate(n);
}

// Parses a template with llama.cpp's own lexer and parser, throws TemplateRefused at the
// first sign of abuse, and instruments its macros. `what` names the template in messages
// ("chat template", "tool_use chat template").
class TemplateChecker {
  public:
    TemplateChecker(std::string what, size_t max_macro_depth)
        : what_(std::move(what)), max_macro_depth_(max_macro_depth) {}

    // The source llama.cpp should render: `source` with a depth guard in each macro (unless
    // max_macro_depth is 0), which renders exactly as `source` until a chain of macro calls
    // nests deeper than max_macro_depth, and then raises.
    std::string prepare(const std::string &source) {
        if (source.size() > kTemplateMaxSourceBytes) {
            refuse("is " + std::to_string(source.size()) + " bytes, more than the limit of " +
                   std::to_string(kTemplateMaxSourceBytes));
        }
        if (source.find(kGuardName) != std::string::npos) refuse(std::string("uses the reserved name ") + kGuardName);
        jinja::program prog;
        jinja::lexer_result tokens;
        try {
            jinja::lexer lexer;
            tokens = lexer.tokenize(source);
            check_nesting(tokens.tokens);
            prog = jinja::parse_from_tokens(tokens);
        } catch (const TemplateRefused &) {
            throw;
        } catch (const std::exception &e) {
            throw TemplateInvalid("invalid " + what_ + ": " + e.what());
        }
        check_depth(prog);  // first, iteratively: the checks below recurse over the AST
        collect(&prog, nullptr, 0, 1);
        check_recursion();
        return max_macro_depth_ > 0 ? instrument(tokens) : source;
    }

  private:
    static constexpr const char *kGuardName = "__llama_cpp_macro_depth";

    struct Macro {
        // The macros it calls outside any condition, loop or caller() body: if they lead
        // back to it, every call recurses without end.
        std::vector<std::string> always_calls;
    };

    [[noreturn]] void refuse(const std::string &why) const { throw TemplateRefused("refused " + what_ + ": " + why); }

    // llama.cpp's parser is recursive descent: it recurses once per bracket, block, elif,
    // unary operator, `not`, chained ternary and chained call. Counted on the tokens, before
    // parsing, so that a source of nothing but '(' cannot overflow the parser's stack.
    void check_nesting(const std::vector<jinja::token> &tokens) const {
        using jinja::token;
        size_t brackets = 0, chained = 0;  // chained: within the current tag
        std::vector<size_t> blocks;        // per open block: 1 + its elifs
        size_t in_blocks = 0;
        for (size_t i = 0; i < tokens.size(); ++i) {
            const token &t = tokens[i];
            const token *prev = i > 0 ? &tokens[i - 1] : nullptr;
            switch (t.t) {
                case token::open_paren:
                case token::open_square_bracket:
                case token::open_curly_bracket:
                    ++brackets;
                    if (t.t == token::open_paren && prev &&
                        (prev->t == token::close_paren || prev->t == token::close_square_bracket)) {
                        ++chained;
                    }
                    break;
                case token::close_paren:
                case token::close_square_bracket:
                case token::close_curly_bracket:
                    brackets -= brackets > 0;
                    break;
                case token::unary_operator:
                    ++chained;
                    break;
                case token::open_statement:
                case token::open_expression:
                case token::close_statement:
                case token::close_expression:
                    chained = 0;
                    break;
                case token::identifier:
                    if (t.value == "not" || (t.value == "else" && !(prev && prev->t == token::open_statement))) {
                        ++chained;
                    } else if (prev && prev->t == token::open_statement) {
                        const std::string &k = t.value;
                        if (k == "if" || k == "for" || k == "macro" || k == "call" || k == "filter" ||
                            (k == "set" && !tag_has(tokens, i, token::equals))) {
                            blocks.push_back(1), ++in_blocks;
                        } else if (k == "elif" && !blocks.empty()) {
                            ++blocks.back(), ++in_blocks;
                        } else if (k.rfind("end", 0) == 0 && !blocks.empty()) {
                            in_blocks -= blocks.back();
                            blocks.pop_back();
                        }
                    }
                    break;
                default:
                    break;
            }
            if (brackets + in_blocks + chained > kTemplateMaxAstDepth) {
                refuse("it nests brackets, blocks or operators more than " + std::to_string(kTemplateMaxAstDepth) +
                       " deep");
            }
        }
    }

    // Whether the tag around tokens[i] (up to its %}) has a token of type `type`.
    static bool tag_has(const std::vector<jinja::token> &tokens, size_t i, jinja::token::type type) {
        for (; i < tokens.size() && tokens[i].t != jinja::token::close_statement; ++i) {
            if (tokens[i].t == type) return true;
        }
        return false;
    }

    void check_depth(const jinja::program &prog) const {
        std::vector<std::pair<const jinja::statement *, size_t>> stack{{&prog, 1}};
        while (!stack.empty()) {
            auto [node, depth] = stack.back();
            stack.pop_back();
            if (depth > kTemplateMaxAstDepth) {
                refuse("its syntax tree is nested more than " + std::to_string(kTemplateMaxAstDepth) + " deep");
            }
            for (const jinja::statement *child : template_children(node)) stack.emplace_back(child, depth + 1);
        }
    }

    // Records which macros each macro always calls, and checks loops and repetitions.
    // `macro`: the innermost macro this node is in (null at top level), or null where it may
    // not run (under a condition); `loops`: enclosing for-loops; `iterations`: the product
    // of their statically known lengths.
    void collect(const jinja::statement *node, Macro *macro, size_t loops, int64_t iterations) {
        using namespace jinja;
        auto each = [&](const statements &list, Macro *m, size_t l, int64_t n) {
            for (const auto &stmt : list) collect(stmt.get(), m, l, n);
        };
        if (auto *m = dynamic_cast<const macro_statement *>(node)) {
            const std::string *name = template_identifier(m->name.get());
            Macro *entry = name ? &macros_[*name] : nullptr;
            each(m->args, nullptr, 0, 1);  // defaults: evaluated only when an argument is missing
            each(m->body, entry, 0, 1);
            return;
        }
        if (auto *call = dynamic_cast<const call_expression *>(node)) {
            const std::string *callee = template_identifier(call->callee.get());
            if (callee && *callee == "range") {
                auto n = template_const_length(call);
                if (n && *n > kTemplateMaxConstIterations) {
                    refuse("range() of " + std::to_string(*n) + " items, more than the limit of " +
                           std::to_string(kTemplateMaxConstIterations));
                }
            }
            if (callee && macro) macro->always_calls.push_back(*callee);
            if (!callee) collect(call->callee.get(), macro, loops, iterations);
            each(call->args, macro, loops, iterations);
            return;
        }
        if (auto *call = dynamic_cast<const call_statement *>(node)) {
            collect(call->call.get(), macro, loops, iterations);
            each(call->caller_args, nullptr, loops, iterations);
            each(call->body, nullptr, loops, iterations);  // runs only if the macro calls caller()
            return;
        }
        if (auto *branch = dynamic_cast<const if_statement *>(node)) {
            collect(branch->test.get(), macro, loops, iterations);
            each(branch->body, nullptr, loops, iterations);
            each(branch->alternate, nullptr, loops, iterations);
            return;
        }
        if (auto *ternary = dynamic_cast<const ternary_expression *>(node)) {
            collect(ternary->condition.get(), macro, loops, iterations);
            collect(ternary->true_expr.get(), nullptr, loops, iterations);
            collect(ternary->false_expr.get(), nullptr, loops, iterations);
            return;
        }
        if (auto *select = dynamic_cast<const select_expression *>(node)) {
            collect(select->test.get(), macro, loops, iterations);
            collect(select->lhs.get(), nullptr, loops, iterations);
            return;
        }
        if (auto *bin = dynamic_cast<const binary_expression *>(node)) {
            if (bin->op.value == "and" || bin->op.value == "or") {  // short-circuit
                collect(bin->left.get(), macro, loops, iterations);
                collect(bin->right.get(), nullptr, loops, iterations);
                return;
            }
            if (bin->op.value == "*") {
                auto a = template_const_int(bin->left.get()), b = template_const_int(bin->right.get());
                const auto n = a ? a : b;
                if (!(a && b) && n && *n > kTemplateMaxConstRepeat) {  // both constant: arithmetic
                    refuse("repeats a value " + std::to_string(*n) + " times, more than the limit of " +
                           std::to_string(kTemplateMaxConstRepeat));
                }
            }
        }
        if (auto *loop = dynamic_cast<const for_statement *>(node)) {
            if (loops + 1 > kTemplateMaxLoopNesting) {
                refuse("nests loops more than " + std::to_string(kTemplateMaxLoopNesting) + " deep");
            }
            const int64_t n = template_const_length(loop->iterable.get()).value_or(1);
            const int64_t inner = saturate(static_cast<__int128>(iterations) * std::max<int64_t>(n, 1));
            if (inner > kTemplateMaxConstIterations) {
                refuse("nested loops run " + std::to_string(inner) + " iterations, more than the limit of " +
                       std::to_string(kTemplateMaxConstIterations));
            }
            collect(loop->iterable.get(), macro, loops, iterations);
            each(loop->body, nullptr, loops + 1, inner);
            each(loop->default_block, nullptr, loops, iterations);
            return;
        }
        for (const jinja::statement *child : template_children(node)) collect(child, macro, loops, iterations);
    }

    // A macro that always calls itself, directly or through other macros that always call
    // the next, recurses until the stack overflows whenever it is called: refused.
    void check_recursion() const {
        std::map<std::string, int> state;  // 0 new, 1 on the path, 2 done
        for (const auto &[start, unused] : macros_) {
            if (state[start] != 0) continue;
            std::vector<std::pair<std::string, size_t>> path{{start, 0}};
            state[start] = 1;
            while (!path.empty()) {
                auto &[name, next] = path.back();
                const auto &out = macros_.at(name).always_calls;
                if (next == out.size()) {
                    state[name] = 2;
                    path.pop_back();
                    continue;
                }
                const std::string target = out[next++];
                if (!macros_.count(target)) continue;
                if (state[target] == 1) {
                    std::string cycle;
                    bool on = false;
                    for (const auto &step : path) {
                        on = on || step.first == target;
                        if (on) cycle += step.first + " -> ";
                    }
                    refuse("macro '" + target + "' always calls itself (" + cycle + target + "), without end");
                }
                if (state[target] == 0) {
                    state[target] = 1;
                    path.emplace_back(target, 0);
                }
            }
        }
    }

    // The lexer's (normalized) source with a depth guard around each macro's body:
    //   {% set G = namespace(n=0) %}\n       (first; trim_blocks eats the \n)
    //   {% macro m() %}{% set G.n = G.n + 1 %}{% if G.n > N %}{{ raise_exception(...) }}{% endif %}
    //   ...body...{% set G.n = G.n - 1 %}{% endmacro %}
    // Whitespace control is copied from the macro's own tags (`-%}` after the macro tag,
    // `{%-` before endmacro), so that the body's text is trimmed exactly as before. A
    // namespace is shared by reference with the macros' scopes, so one counter counts the
    // depth of nested macro calls.
    std::string instrument(const jinja::lexer_result &lexed) const {
        using jinja::token;
        const std::string &src = lexed.source;
        const auto &tokens = lexed.tokens;
        const std::string g = kGuardName, limit = std::to_string(max_macro_depth_);
        std::vector<std::pair<size_t, std::string>> inserts;
        std::vector<std::string> open;  // names of the macros being defined
        for (size_t i = 1; i < tokens.size(); ++i) {
            if (tokens[i].t != token::identifier || tokens[i - 1].t != token::open_statement) continue;
            const size_t tag = tokens[i - 1].pos;
            if (src.compare(tag, 2, "{%") != 0) throw std::logic_error("unexpected token position in a template");
            if (tokens[i].value == "macro") {
                size_t close = i;
                while (close < tokens.size() && tokens[close].t != token::close_statement) ++close;
                const size_t end = close < tokens.size() ? src.find("%}", tokens[close].pos) : std::string::npos;
                if (end == std::string::npos) throw std::logic_error("macro tag without %} in a template");
                const bool rstrip = end > 0 && src[end - 1] == '-';
                const std::string name = i + 1 < tokens.size() ? tokens[i + 1].value : "?";
                open.push_back(name);
                inserts.emplace_back(end + 2, "{% set " + g + ".n = " + g + ".n + 1 %}{% if " + g + ".n > " + limit +
                                                  " %}{{ raise_exception(\"macro '" + name +
                                                  "' called with more than " + limit +
                                                  " macro calls nested\") }}{% endif " + (rstrip ? "-%}" : "%}"));
            } else if (tokens[i].value == "endmacro" && !open.empty()) {
                open.pop_back();
                const bool lstrip = src.compare(tag, 3, "{%-") == 0;
                inserts.emplace_back(tag, std::string(lstrip ? "{%-" : "{%") + " set " + g + ".n = " + g + ".n - 1 %}");
            }
        }
        std::string out = "{% set " + g + " = namespace(n=0) %}\n";
        size_t from = 0;
        for (const auto &[at, text] : inserts) {
            out.append(src, from, at - from);
            out += text;
            from = at;
        }
        out.append(src, from, std::string::npos);
        // The lexer strips one trailing newline, which it already did for `src`.
        out += '\n';
        return out;
    }

    std::string what_;
    size_t max_macro_depth_;
    std::map<std::string, Macro> macros_;
};

// Runs `work` on a detached thread of its own (`stack_bytes` of stack) and waits for it
// until `time_limit` seconds have passed. Returns true when it finished (rethrowing what it
// threw), false at the deadline: the thread is then left running, holding only what `work`
// captured (shared pointers), and ends when the render does.
class BoundedRun {
  public:
    static bool run(std::function<void()> work, double time_limit, size_t stack_bytes) {
        auto job = std::make_shared<Job>();
        job->work = std::move(work);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, stack_bytes);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        auto *arg = new std::shared_ptr<Job>(job);
        pthread_t thread;
        const int rc = pthread_create(&thread, &attr, &BoundedRun::main, arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            delete arg;
            throw LlamaError(std::string("cannot start a thread to render the chat template: ") + std::strerror(rc));
        }
        std::unique_lock<std::mutex> lock(job->mutex);
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(time_limit);
        if (!job->done_cv.wait_until(lock, deadline, [&job] { return job->done; })) {
            job->abandoned = true;
            abandon();
            return false;
        }
        if (job->error) std::rethrow_exception(job->error);
        return true;
    }

    // Renders left running past their deadline, and not finished yet.
    static int running_abandoned() { return abandoned_.load(); }

  private:
    struct Job {
        std::function<void()> work;
        std::mutex mutex;
        std::condition_variable done_cv;
        bool done = false;
        bool abandoned = false;
        std::exception_ptr error;
    };

    static inline std::atomic<int> abandoned_{0};

    // A render left running must not meet the process's exit: exit() runs the static
    // destructors of llama.cpp's common library (its table of Jinja builtins, ...) while
    // the render still uses them, and the process crashes on its way out. So, from the
    // first abandoned render on, an exit handler ends the process with _Exit (the same
    // status, stdio flushed) while one is still running. It is registered after those
    // statics were built (a render built them), so it runs before their destructors.
    static void abandon() {
        ++abandoned_;
        static std::once_flag registered;
        std::call_once(registered, [] {
            on_exit(
                [](int status, void *) {
                    if (abandoned_.load() > 0) {
                        std::fflush(nullptr);
                        std::_Exit(status);
                    }
                },
                nullptr);
        });
    }

    static void *main(void *arg) {
        std::shared_ptr<Job> job = std::move(*static_cast<std::shared_ptr<Job> *>(arg));
        delete static_cast<std::shared_ptr<Job> *>(arg);
        std::exception_ptr error;
        try {
            job->work();
        } catch (...) {
            error = std::current_exception();
        }
        job->work = nullptr;  // drop what it captured (the templates, the model) on this thread
        {
            std::lock_guard<std::mutex> lock(job->mutex);
            job->error = error;
            job->done = true;
            if (job->abandoned) --abandoned_;
        }
        job->done_cv.notify_all();
        return nullptr;
    }
};

class ChatTemplates {
  public:
    // `override_template`: Jinja source to use instead of the model's; empty: the model's
    // (llama.cpp falls back to ChatML when the model has none). Each template is checked and
    // instrumented (TemplateChecker), then loaded by llama.cpp within `time_limit` seconds;
    // renders run within it too, their macro calls nest at most `max_macro_depth` deep (0:
    // no guard), and a prompt longer than `max_output_bytes` is refused.
    ChatTemplates(const Model &model, const std::string &override_template, double time_limit,
                  size_t max_output_bytes, size_t max_macro_depth)
        : model_(model.handle()), time_limit_(time_limit), max_output_bytes_(max_output_bytes),
          max_macro_depth_(max_macro_depth) {
        if (!(time_limit > 0) || !std::isfinite(time_limit)) {
            throw InvalidArgumentError("time_limit must be a number of seconds > 0, got " + std::to_string(time_limit));
        }
        if (max_output_bytes == 0) throw InvalidArgumentError("max_output_bytes must be > 0");
        if (max_macro_depth > kTemplateMaxMacroDepth) {
            throw InvalidArgumentError("max_macro_depth must be <= " + std::to_string(kTemplateMaxMacroDepth) +
                                       ", got " + std::to_string(max_macro_depth));
        }
        // Which sources llama.cpp would use, as common_chat_templates_init chooses them:
        // given them explicitly (instrumented), it reads nothing from the model.
        std::string main = override_template, tool_use;
        if (main.empty()) {
            const char *tmpl = llama_model_chat_template(model_.get(), nullptr);
            const char *tools = llama_model_chat_template(model_.get(), "tool_use");
            main = tmpl ? tmpl : "";
            tool_use = tools ? tools : "";
            if ((main.empty() || main == "chatml") && !tool_use.empty()) main = std::move(tool_use), tool_use.clear();
        }
        source_ = main;
        // Checked and loaded on the render thread: parsing recurses as deep as the source
        // nests, and llama.cpp's init renders each template to detect its capabilities.
        struct Loaded {
            common_chat_templates_ptr main, tool_use;
        };
        auto loaded = std::make_shared<Loaded>();
        const ModelHandle model_ref = model_;
        const bool finished = BoundedRun::run(
            [loaded, model_ref, main, tool_use, max_macro_depth] {
                auto load = [&](const std::string &src, const char *what) {
                    try {
                        // Empty or "chatml": llama.cpp's own ChatML, nothing to check.
                        const std::string guarded = src.empty() || src == "chatml"
                                                        ? src
                                                        : TemplateChecker(what, max_macro_depth).prepare(src);
                        return common_chat_templates_init(model_ref.get(), guarded);
                    } catch (const LlamaError &) {
                        throw;
                    } catch (const std::exception &e) {  // a parse error, bad_alloc, ...
                        throw TemplateInvalid(std::string("invalid ") + what + ": " + e.what());
                    }
                };
                loaded->main = load(main, "chat template");
                if (!tool_use.empty()) {
                    try {
                        loaded->tool_use = load(tool_use, "tool_use chat template");
                    } catch (const TemplateInvalid &e) {
                        // As llama.cpp: a tool_use template that does not parse is ignored
                        // (the default one renders requests with tools too). One that is
                        // refused as abuse refuses the model's templates.
                        emit_log_line(GGML_LOG_LEVEL_WARN,
                                      std::string("ignoring the model's tool_use chat template: ") + e.what());
                    }
                }
            },
            time_limit, template_stack_bytes(max_macro_depth));
        if (!finished) {
            throw TemplateRefused("refused chat template: loading it (llama.cpp renders it to detect its "
                                  "capabilities) ran past the time limit of " + format_seconds(time_limit) +
                                  " s; the render could not be stopped and runs on in the background");
        }
        templates_ = std::shared_ptr<common_chat_templates>(std::move(loaded->main));
        if (loaded->tool_use) tool_use_ = std::shared_ptr<common_chat_templates>(std::move(loaded->tool_use));
    }

    // The template as given (the model's or the override; llama.cpp's ChatML if neither),
    // without the depth guards.
    std::string source() const {
        return source_.empty() || source_ == "chatml" ? common_chat_templates_source(templates_.get()) : source_;
    }
    bool supports_thinking() const {
        // llama.cpp finds out by rendering a conversation: bounded like any other render.
        common_chat_templates_inputs inputs;
        inputs.messages = {common_chat_msg{}};
        inputs.messages[0].role = "user";
        inputs.messages[0].content = "test";
        inputs.enable_thinking = true;
        inputs.add_generation_prompt = true;
        inputs.reasoning_format = COMMON_REASONING_FORMAT_DEEPSEEK;
        return render(inputs).supports_thinking;
    }
    std::vector<std::pair<std::string, bool>> caps() const {
        // As common_chat_templates_get_caps: the tool_use template's when there is one.
        auto caps = common_chat_templates_get_caps((tool_use_ ? tool_use_ : templates_).get());
        return {caps.begin(), caps.end()};
    }

    ChatParams apply(const ChatRequest &request) const {
        common_chat_templates_inputs inputs;
        try {
            inputs.messages = common_chat_msgs_parse_oaicompat(common_json::parse(request.messages));
            if (!request.tools.empty()) {
                inputs.tools = common_chat_tools_parse_oaicompat(common_json::parse(request.tools));
            }
            inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(request.tool_choice);
        } catch (const std::exception &e) {
            throw InvalidArgumentError(std::string("invalid chat request: ") + e.what());
        }
        inputs.json_schema = request.json_schema;
        inputs.parallel_tool_calls = request.parallel_tool_calls;
        inputs.add_generation_prompt = request.add_generation_prompt;
        inputs.enable_thinking = request.enable_thinking;
        inputs.reasoning_format = reasoning_format(request.reasoning_format);
        for (const auto &[name, value] : request.template_kwargs) {
            inputs.chat_template_kwargs[name] = value;
        }
        common_chat_params params = render(inputs);
        const llama_vocab *vocab = llama_model_get_vocab(model_.get());
        ChatParams out;
        out.prompt = std::move(params.prompt);
        out.format = common_chat_format_name(params.format);
        out.grammar = params.grammar;
        out.grammar_lazy = params.grammar_lazy;
        out.additional_stops = params.additional_stops;
        out.generation_prompt = params.generation_prompt;
        out.supports_thinking = params.supports_thinking;
        out.thinking_start_tag = params.thinking_start_tag;
        out.thinking_end_tags = params.thinking_end_tags;
        for (const std::string &text : params.preserved_tokens) {
            const auto ids = Model::tokenize_with(vocab, text, false, true);
            if (ids.size() == 1) out.preserved_tokens.push_back(ids[0]);
        }
        // Triggers as common_sampler_init turns them into a lazy grammar's arguments.
        for (const common_grammar_trigger &trigger : params.grammar_triggers) {
            switch (trigger.type) {
                case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                    if (trigger.token != LLAMA_TOKEN_NULL) {
                        out.grammar_trigger_tokens.push_back(trigger.token);
                        break;
                    }
                    const auto ids = Model::tokenize_with(vocab, trigger.value, false, true);
                    if (ids.size() == 1 && is_preserved(out, ids[0])) {
                        out.grammar_trigger_tokens.push_back(ids[0]);
                    } else {
                        out.grammar_trigger_patterns.push_back(regex_escape(trigger.value));
                    }
                    break;
                }
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                    out.grammar_trigger_patterns.push_back(trigger.value);
                    break;
                case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                    const std::string &p = trigger.value;
                    out.grammar_trigger_patterns.push_back(
                        p.empty() ? "^$" : (p.front() != '^' ? "^" : "") + p + (p.back() != '$' ? "$" : ""));
                    break;
                }
            }
        }
        // A template-made grammar (tools, schema) starts where the generation prompt ends:
        // feed it that prompt first, as common_sampler_init does.
        if (!out.grammar.empty() && !out.grammar_lazy && !out.generation_prompt.empty()) {
            const auto ids = Model::tokenize_with(vocab, out.generation_prompt, false, true);
            for (size_t i = 0; i < ids.size(); ++i) {
                const std::string piece = Model::piece_with(vocab, ids[i], true);
                // Some tokenizers put a space before the first special token.
                if (i == 0 && !piece.empty() && std::isspace(static_cast<unsigned char>(piece[0])) &&
                    !std::isspace(static_cast<unsigned char>(out.generation_prompt[0]))) {
                    continue;
                }
                out.grammar_prefill.push_back(ids[i]);
            }
        }
        auto parser = std::make_shared<common_chat_parser_params>(params);
        parser->reasoning_format = inputs.reasoning_format;
        parser->parse_tool_calls = !inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE;
        if (!params.parser.empty()) {
            parser->parser.load(params.parser);
        }
        out.parser = std::move(parser);
        return out;
    }

    double time_limit() const { return time_limit_; }
    size_t max_output_bytes() const { return max_output_bytes_; }
    size_t max_macro_depth() const { return max_macro_depth_; }

    // Why these templates are refused for good (a render ran past its deadline); empty if not.
    std::string refused() const {
        std::lock_guard<std::mutex> lock(refusal_->mutex);
        return refusal_->reason;
    }

  private:
    struct Refusal {
        std::mutex mutex;
        std::string reason;
    };

    static std::string format_seconds(double s) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%g", s);
        return buf;
    }

    // common_chat_templates_apply on the render thread, within the time and output limits.
    common_chat_params render(const common_chat_templates_inputs &inputs) const {
        if (std::string reason = refused(); !reason.empty()) throw TemplateRefused(reason);
        auto params = std::make_shared<common_chat_params>();
        bool finished = false;
        try {
            // The thread gets its own copies: it may outlive this call (and these templates).
            // As llama.cpp picks: the tool_use template when there are tools and one.
            const auto &templates = tool_use_ && !inputs.tools.empty() ? tool_use_ : templates_;
            finished = BoundedRun::run(
                [params, templates, inputs] { *params = common_chat_templates_apply(templates.get(), inputs); },
                time_limit_, template_stack_bytes(max_macro_depth_));
        } catch (const LlamaError &) {
            throw;
        } catch (const std::exception &e) {
            throw TemplateRefused(std::string("the chat template failed: ") + e.what());
        }
        if (!finished) {
            const std::string reason = "refused chat template: a render ran past the time limit of " +
                                       format_seconds(time_limit_) +
                                       " s (it could not be stopped and runs on in the background); these "
                                       "templates are refused from now on";
            std::lock_guard<std::mutex> lock(refusal_->mutex);
            refusal_->reason = reason;
            throw TemplateRefused(reason);
        }
        if (params->prompt.size() > max_output_bytes_) {
            throw TemplateRefused("the chat template's output is " + std::to_string(params->prompt.size()) +
                                  " bytes, more than max_output_bytes=" + std::to_string(max_output_bytes_));
        }
        return std::move(*params);
    }

    static common_reasoning_format reasoning_format(const std::string &name) {
        if (name == "none") return COMMON_REASONING_FORMAT_NONE;
        if (name == "auto") return COMMON_REASONING_FORMAT_AUTO;
        if (name == "deepseek") return COMMON_REASONING_FORMAT_DEEPSEEK;
        if (name == "deepseek-legacy") return COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY;
        throw InvalidArgumentError("reasoning_format must be none, auto, deepseek or deepseek-legacy, got '" + name +
                                   "'");
    }

    static bool is_preserved(const ChatParams &params, llama_token token) {
        return std::find(params.preserved_tokens.begin(), params.preserved_tokens.end(), token) !=
               params.preserved_tokens.end();
    }

    ModelHandle model_;  // the templates hold the model's BOS/EOS text; the vocab is used by apply
    // Shared with render threads, which may outlive a call that timed out.
    std::shared_ptr<const common_chat_templates> templates_;
    std::shared_ptr<const common_chat_templates> tool_use_;  // the model's tool_use template, if any
    std::string source_;
    double time_limit_;
    size_t max_output_bytes_;
    size_t max_macro_depth_;
    std::shared_ptr<Refusal> refusal_ = std::make_shared<Refusal>();
};

// Parses a chat format's generated text into an OpenAI message, whole or as it streams.
class ChatParser {
  public:
    explicit ChatParser(const ChatParams &params) : params_(params.parser) {
        if (!params_) throw InvalidArgumentError("these ChatParams were not made by ChatTemplates.apply");
    }

    // The message in `text` as OpenAI JSON ({"role", "content", "reasoning_content",
    // "tool_calls"}). `is_partial`: more text may follow. Text that does not follow the format
    // is returned whole as content (with a warning in the log) when it is final.
    std::string parse(const std::string &text, bool is_partial) {
        return to_json(parse_message(text, is_partial));
    }

    // Streaming: appends `delta` and returns how the message changed since the last call.
    std::vector<ChatDelta> update(const std::string &delta, bool is_partial) {
        text_ += delta;
        common_chat_msg next = parse_message(text_, is_partial);
        std::vector<ChatDelta> out;
        if (next.empty()) return out;
        std::vector<common_chat_msg_diff> diffs;
        try {
            diffs = common_chat_msg_diff::compute_diffs(message_, next);
        } catch (const std::exception &) {
            // The final text fell back to plain content, which does not extend what was
            // parsed so far: nothing more can be streamed as a delta.
            message_ = std::move(next);
            return out;
        }
        for (const common_chat_msg_diff &d : diffs) {
            ChatDelta entry;
            entry.content = d.content_delta;
            entry.reasoning_content = d.reasoning_content_delta;
            if (d.tool_call_index != std::string::npos) {
                entry.tool_call_index = static_cast<int32_t>(d.tool_call_index);
                entry.tool_call_id = d.tool_call_delta.id;
                if (entry.tool_call_id.empty() && !d.tool_call_delta.name.empty() &&
                    d.tool_call_index < next.tool_calls.size()) {
                    entry.tool_call_id = next.tool_calls[d.tool_call_index].id;
                }
                entry.tool_call_name = d.tool_call_delta.name;
                entry.tool_call_arguments = d.tool_call_delta.arguments;
            }
            out.push_back(std::move(entry));
        }
        message_ = std::move(next);
        return out;
    }

    // The final text did not follow the format and was returned whole as content.
    bool fell_back() const { return fell_back_; }

  private:
    common_chat_msg parse_message(const std::string &text, bool is_partial) {
        common_chat_msg msg;
        try {
            msg = common_chat_parse(text, is_partial, *params_);
        } catch (const std::exception &) {
            if (is_partial) return message_;  // wait for more text
            fell_back_ = true;
            msg.role = "assistant";
            msg.content = text;
        }
        msg.set_tool_call_ids(tool_call_ids_, [this] { return new_tool_call_id(); });
        return msg;
    }

    static std::string to_json(const common_chat_msg &msg) {
        common_json out = msg.to_json_oaicompat();
        out["role"] = "assistant";
        return out.dump();
    }

    std::string new_tool_call_id() {
        static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        std::uniform_int_distribution<size_t> pick(0, sizeof(alphabet) - 2);
        std::string id = "call_";
        for (int i = 0; i < 24; ++i) id += alphabet[pick(rng_)];
        return id;
    }

    std::shared_ptr<const common_chat_parser_params> params_;
    std::string text_;
    common_chat_msg message_;
    std::vector<std::string> tool_call_ids_;
    bool fell_back_ = false;
    std::mt19937_64 rng_{std::random_device{}()};
};

void bind_chat(nb::module_ &m) {
    nb::class_<ChatRequest>(m, "ChatRequest", "What to render: messages, tools and options (JSON text).")
        .def(nb::init<>())
        .def_rw("messages", &ChatRequest::messages)
        .def_rw("tools", &ChatRequest::tools)
        .def_rw("tool_choice", &ChatRequest::tool_choice)
        .def_rw("json_schema", &ChatRequest::json_schema)
        .def_rw("parallel_tool_calls", &ChatRequest::parallel_tool_calls)
        .def_rw("add_generation_prompt", &ChatRequest::add_generation_prompt)
        .def_rw("enable_thinking", &ChatRequest::enable_thinking)
        .def_rw("reasoning_format", &ChatRequest::reasoning_format)
        .def_rw("template_kwargs", &ChatRequest::template_kwargs);
    nb::class_<ChatParams>(m, "ChatParams", "A rendered conversation and what its generation needs.")
        .def_ro("prompt", &ChatParams::prompt)
        .def_ro("format", &ChatParams::format)
        .def_ro("grammar", &ChatParams::grammar)
        .def_ro("grammar_lazy", &ChatParams::grammar_lazy)
        .def_ro("grammar_trigger_patterns", &ChatParams::grammar_trigger_patterns)
        .def_ro("grammar_trigger_tokens", &ChatParams::grammar_trigger_tokens)
        .def_ro("grammar_prefill", &ChatParams::grammar_prefill)
        .def_ro("preserved_tokens", &ChatParams::preserved_tokens)
        .def_ro("additional_stops", &ChatParams::additional_stops)
        .def_ro("generation_prompt", &ChatParams::generation_prompt)
        .def_ro("supports_thinking", &ChatParams::supports_thinking)
        .def_ro("thinking_start_tag", &ChatParams::thinking_start_tag)
        .def_ro("thinking_end_tags", &ChatParams::thinking_end_tags);
    nb::class_<ChatDelta>(m, "ChatDelta", "One change of a streamed chat message.")
        .def_ro("content", &ChatDelta::content)
        .def_ro("reasoning_content", &ChatDelta::reasoning_content)
        .def_ro("tool_call_index", &ChatDelta::tool_call_index)
        .def_ro("tool_call_id", &ChatDelta::tool_call_id)
        .def_ro("tool_call_name", &ChatDelta::tool_call_name)
        .def_ro("tool_call_arguments", &ChatDelta::tool_call_arguments);
    nb::class_<ChatTemplates>(m, "ChatTemplates",
                              "A model's chat templates, rendered by llama.cpp's Jinja engine within limits "
                              "(docs/hardening.md, \"Hostile chat templates\"): TemplateError past them.")
        .def(nb::init<const Model &, const std::string &, double, size_t, size_t>(), "model"_a,
             "override_template"_a = "", nb::kw_only(), "time_limit"_a = kTemplateDefaultTimeLimit,
             "max_output_bytes"_a = kTemplateDefaultMaxOutputBytes,
             "max_macro_depth"_a = kTemplateDefaultMaxMacroDepth, nb::call_guard<nb::gil_scoped_release>())
        .def("apply", &ChatTemplates::apply, "request"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("source", &ChatTemplates::source)
        .def("supports_thinking", &ChatTemplates::supports_thinking, nb::call_guard<nb::gil_scoped_release>())
        .def("caps", &ChatTemplates::caps)
        .def_prop_ro("time_limit", &ChatTemplates::time_limit)
        .def_prop_ro("max_output_bytes", &ChatTemplates::max_output_bytes)
        .def_prop_ro("max_macro_depth", &ChatTemplates::max_macro_depth)
        .def_prop_ro("refused", &ChatTemplates::refused);
    m.attr("TEMPLATE_MAX_SOURCE_BYTES") = kTemplateMaxSourceBytes;
    m.attr("TEMPLATE_MAX_AST_DEPTH") = kTemplateMaxAstDepth;
    m.attr("TEMPLATE_MAX_LOOP_NESTING") = kTemplateMaxLoopNesting;
    m.attr("TEMPLATE_MAX_CONST_ITERATIONS") = kTemplateMaxConstIterations;
    m.attr("TEMPLATE_MAX_CONST_REPEAT") = kTemplateMaxConstRepeat;
    m.attr("TEMPLATE_DEFAULT_TIME_LIMIT") = kTemplateDefaultTimeLimit;
    m.attr("TEMPLATE_DEFAULT_MAX_OUTPUT_BYTES") = kTemplateDefaultMaxOutputBytes;
    m.attr("TEMPLATE_DEFAULT_MAX_MACRO_DEPTH") = kTemplateDefaultMaxMacroDepth;
    m.attr("TEMPLATE_MAX_MACRO_DEPTH") = kTemplateMaxMacroDepth;
    // TemplateRefused becomes llama_cpp.errors.TemplateError, a Python class (an
    // InvalidArgumentError): looked up when first raised, once llama_cpp is imported.
    nb::register_exception_translator([](const std::exception_ptr &p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const TemplateRefused &e) {
            static PyObject *template_error = [] {
                PyObject *errors = PyImport_ImportModule("llama_cpp.errors");
                PyObject *type = errors ? PyObject_GetAttrString(errors, "TemplateError") : nullptr;
                Py_XDECREF(errors);
                if (type == nullptr) PyErr_Clear();
                return type;  // kept for the process's life
            }();
            PyErr_SetString(template_error ? template_error : py_invalid_argument_error, e.what());
        }
    });
    nb::class_<ChatParser>(m, "ChatParser", "Parses generated text in a chat format into an OpenAI message.")
        .def(nb::init<const ChatParams &>(), "params"_a)
        .def("parse", &ChatParser::parse, "text"_a, "is_partial"_a = false, nb::call_guard<nb::gil_scoped_release>())
        .def("update", &ChatParser::update, "delta"_a, "is_partial"_a = true,
             nb::call_guard<nb::gil_scoped_release>())
        .def_prop_ro("fell_back", &ChatParser::fell_back);
}

// =====================================================================================
// Text: incremental UTF-8 and stop strings
// =====================================================================================

// Length of the UTF-8 sequence that starts with byte `c`, or 0 if `c` cannot start one.
size_t utf8_sequence_length(unsigned char c) {
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if (c >= 0xE0 && c <= 0xEF) return 3;
    if (c >= 0xF0 && c <= 0xF4) return 4;
    return 0;
}

// Whether bytes [1, n) of a sequence starting with `lead` are acceptable continuation bytes
// (the second byte is range-restricted to exclude overlongs, surrogates and > U+10FFFF).
bool utf8_continuation_ok(unsigned char lead, const unsigned char *rest, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        unsigned char c = rest[i];
        unsigned char lo = 0x80, hi = 0xBF;
        if (i == 0) {
            if (lead == 0xE0) lo = 0xA0;
            if (lead == 0xED) hi = 0x9F;
            if (lead == 0xF0) lo = 0x90;
            if (lead == 0xF4) hi = 0x8F;
        }
        if (c < lo || c > hi) return false;
    }
    return true;
}

// Incremental UTF-8 decoding of token pieces: bytes come in, valid text goes out. A
// character split across tokens is held back until it is complete; bytes that can never
// form a character become U+FFFD, so the output is always valid UTF-8.
class Utf8Decoder {
  public:
    std::string push(const std::string &bytes) {
        pending_ += bytes;
        return drain(false);
    }
    std::string flush() { return drain(true); }

  private:
    std::string drain(bool final) {
        static const std::string replacement = "\xEF\xBF\xBD";
        std::string out;
        size_t i = 0;
        const auto *p = reinterpret_cast<const unsigned char *>(pending_.data());
        const size_t n = pending_.size();
        while (i < n) {
            size_t len = utf8_sequence_length(p[i]);
            if (len == 0) {
                out += replacement;
                i += 1;
                continue;
            }
            size_t avail = std::min(len, n - i) - 1;
            if (!utf8_continuation_ok(p[i], p + i + 1, avail)) {
                out += replacement;  // a broken sequence: replace its lead byte, resync
                i += 1;
                continue;
            }
            if (avail + 1 < len) {
                if (!final) break;  // incomplete: wait for the next token
                out += replacement;
                i = n;
                break;
            }
            out.append(pending_, i, len);
            i += len;
        }
        pending_.erase(0, i);
        return out;
    }

    std::string pending_;
};

// Stop strings matched on text, across token boundaries. Text that might be the start of a
// stop string is held back until it is known not to be, so a stop never leaks into output.
class StopMatcher {
  public:
    explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
        stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
    }

    // Appends `text`; returns what can be released. Sets `stopped` when a stop string is found
    // (the returned text then ends right before it, and matched() is that string: the one
    // found first in the text, the longest of those starting there).
    std::string push(const std::string &text, bool &stopped) {
        held_ += text;
        size_t first = std::string::npos;
        for (const auto &stop : stops_) {
            size_t pos = held_.find(stop);
            if (pos < first || (pos == first && pos != std::string::npos && stop.size() > matched_.size())) {
                first = pos;
                matched_ = stop;
            }
        }
        if (first != std::string::npos) {
            stopped = true;
            std::string out = held_.substr(0, first);
            held_.clear();
            return out;
        }
        size_t keep = 0;
        for (const auto &stop : stops_) {
            size_t max_len = std::min(stop.size() - 1, held_.size());
            for (size_t len = max_len; len > keep; --len) {
                if (held_.compare(held_.size() - len, len, stop, 0, len) == 0) {
                    keep = len;
                    break;
                }
            }
        }
        std::string out = held_.substr(0, held_.size() - keep);
        held_.erase(0, held_.size() - keep);
        return out;
    }

    std::string flush() {
        std::string out;
        out.swap(held_);
        return out;
    }

    // The stop string that ended the text, once push() has reported one.
    const std::string &matched() const { return matched_; }

  private:
    std::vector<std::string> stops_;
    std::string held_;
    std::string matched_;
};

// The end of a generation: the decoder's last bytes, through the stop strings, then whatever
// the matcher still holds (unless a stop string completed).
std::string flush_text(StopMatcher &stop, Utf8Decoder &decoder, bool &stopped) {
    std::string out = stop.push(decoder.flush(), stopped);
    return stopped ? out : out + stop.flush();
}

struct TokenLogprob {
    llama_token token = 0;
    float logprob = 0.0f;
    std::vector<std::pair<llama_token, float>> top;  // most likely first
};

// log_softmax of raw logits at `token`, and the k most likely tokens: what the model said,
// before temperature, penalties or any other sampler touched it.
TokenLogprob logprob_of(const float *logits, int32_t n_vocab, llama_token token, int32_t k) {
    const float max_logit = *std::max_element(logits, logits + n_vocab);
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum += std::exp(static_cast<double>(logits[i] - max_logit));
    }
    const auto log_z = static_cast<float>(max_logit + std::log(sum));
    TokenLogprob out;
    out.token = token;
    out.logprob = logits[token] - log_z;
    k = std::min(k, n_vocab);
    if (k > 0) {
        std::vector<llama_token> ids(static_cast<size_t>(n_vocab));
        std::iota(ids.begin(), ids.end(), 0);
        std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](llama_token a, llama_token b) {
            return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
        });
        for (int32_t i = 0; i < k; ++i) {
            out.top.emplace_back(ids[static_cast<size_t>(i)], logits[ids[static_cast<size_t>(i)]] - log_z);
        }
    }
    return out;
}

// A flag shared between Python and a running generation: cancel() stops it at the next
// token, or inside llama_decode through the context's abort callback.
class Cancellation {
  public:
    void cancel() const { flag_->store(true); }
    bool cancelled() const { return flag_->load(); }
    const std::shared_ptr<std::atomic<bool>> &flag() const { return flag_; }

  private:
    std::shared_ptr<std::atomic<bool>> flag_ = std::make_shared<std::atomic<bool>>(false);
};

void bind_text(nb::module_ &m) {
    // The text rules on their own, for tests that split text at every possible point.
    nb::class_<Utf8Decoder>(m, "Utf8Decoder", "Incremental UTF-8: bytes in, whole characters out.")
        .def(nb::init<>())
        .def(
            "push", [](Utf8Decoder &self, nb::bytes data) { return self.push(std::string(data.c_str(), data.size())); },
            "data"_a, "Add bytes; returns the text they complete (invalid bytes become U+FFFD).")
        .def("flush", &Utf8Decoder::flush, "The end: whatever is held back, incomplete sequences as U+FFFD.");
    nb::class_<StopMatcher>(m, "StopMatcher", "Stop strings matched across pieces of text.")
        .def(nb::init<std::vector<std::string>>(), "stops"_a)
        .def(
            "push",
            [](StopMatcher &self, const std::string &text) {
                bool stopped = false;
                std::string out = self.push(text, stopped);
                return std::make_pair(out, stopped);
            },
            "text"_a, "Add text; returns (text that can be released, whether a stop string completed).")
        .def("flush", &StopMatcher::flush, "The end: the text held back as a possible stop-string start.");

    nb::class_<TokenLogprob>(m, "TokenLogprob", "log_softmax of the raw logits at a token.")
        .def(
            "__init__",
            [](TokenLogprob *self, llama_token token, float logprob, std::vector<std::pair<llama_token, float>> top) {
                new (self) TokenLogprob{token, logprob, std::move(top)};
            },
            "token"_a, "logprob"_a, "top"_a, "One computed elsewhere (a child process of an IsolatedPool).")
        .def_ro("token", &TokenLogprob::token)
        .def_ro("logprob", &TokenLogprob::logprob)
        .def_ro("top", &TokenLogprob::top, "The most likely tokens and their logprobs, best first.");

    nb::class_<Cancellation>(m, "Cancellation", "A flag that stops a generation it is given to.")
        .def(nb::init<>())
        .def("cancel", &Cancellation::cancel, "Stop the generation at its next token or decode step.")
        .def_prop_ro("cancelled", &Cancellation::cancelled);
}

// =====================================================================================
// Decoding: the rules of one sequence
// =====================================================================================
//
// What turns one sequence's logits into output lives here, once, for both front ends: the
// single-context loop (Generation) runs one SequenceDecoder, the engine one per slot. It
// samples (a llama.cpp chain, or an argmax for plain greedy decoding), runs the Python hooks,
// scores logprobs, decodes UTF-8 incrementally, matches stop strings and applies the limits.
// The caller owns the KV cache: it decodes the prompt and every token the decoder accepts,
// and tells the decoder which logits row is its sequence's and how many tokens it holds.

template <typename T, size_t N>
using Array = nb::ndarray<nb::numpy, T, nb::ndim<N>, nb::c_contig>;
template <size_t N>
using FloatArray = Array<float, N>;

// A numpy array of `shape` that owns `data`: the vector moves into a capsule that frees it
// when the array dies (no copy, nothing shared with llama.cpp's buffers or with a vector C++
// keeps using, so Python may keep it). Call with the GIL held.
template <typename T, size_t N>
Array<T, N> owned_array(std::vector<T> &&data, const std::array<size_t, N> &shape) {
    auto owner = std::make_unique<std::vector<T>>(std::move(data));
    owner->reserve(1);  // an empty array still gets a valid data pointer
    T *values = owner->data();
    nb::capsule capsule(owner.get(), [](void *p) noexcept { delete static_cast<std::vector<T> *>(p); });
    owner.release();
    return Array<T, N>(values, N, shape.data(), capsule);
}

// Per-token Python hooks (llama-cpp-python's logits_processor / stopping_criteria): the slow
// path. Each is called with the GIL re-acquired, as hook(token_ids, logits), with numpy
// copies that Python owns, so a hook may keep them. The logits hook returns the logits to
// sample from (float32, n_vocab of them), copied back into llama.cpp's buffer; the stop hook
// returns True to end the generation. Held by shared_ptr so that copies of the options never
// touch Python reference counts without the GIL.
class PyHooks {
  public:
    PyHooks(nb::object logits_hook, nb::object stop_hook)
        : logits_(logits_hook.is_none() ? nullptr : logits_hook.release().ptr()),
          stop_(stop_hook.is_none() ? nullptr : stop_hook.release().ptr()) {}
    PyHooks(const PyHooks &) = delete;
    PyHooks &operator=(const PyHooks &) = delete;
    ~PyHooks() {
        if (!Py_IsInitialized() || python_is_finalizing()) return;
        nb::gil_scoped_acquire gil;
        Py_XDECREF(logits_);
        Py_XDECREF(stop_);
    }

    bool has_logits_hook() const { return logits_ != nullptr; }

    void process_logits(const std::vector<llama_token> &tokens, float *logits, int32_t n_vocab) const {
        if (logits_ == nullptr) return;
        nb::gil_scoped_acquire gil;
        nb::object result = call(logits_, tokens, logits, n_vocab);
        nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> scores;
        if (!nb::try_cast(result, scores, false) || scores.shape(0) != static_cast<size_t>(n_vocab)) {
            throw InvalidArgumentError("a logits processor must return " + std::to_string(n_vocab) +
                                       " float32 scores (one per vocabulary entry)");
        }
        std::copy(scores.data(), scores.data() + n_vocab, logits);
    }

    bool should_stop(const std::vector<llama_token> &tokens, const float *logits, int32_t n_vocab) const {
        if (stop_ == nullptr) return false;
        nb::gil_scoped_acquire gil;
        nb::object result = call(stop_, tokens, logits, n_vocab);
        const int truthy = PyObject_IsTrue(result.ptr());
        if (truthy < 0) throw nb::python_error();
        return truthy == 1;
    }

  private:
    static nb::object call(PyObject *hook, const std::vector<llama_token> &tokens, const float *logits,
                           int32_t n_vocab) {
        const auto n = static_cast<size_t>(n_vocab);
        nb::object ids = nb::cast(owned_array<llama_token, 1>(std::vector<llama_token>(tokens), {tokens.size()}));
        nb::object scores = nb::cast(owned_array<float, 1>(std::vector<float>(logits, logits + n), {n}));
        nb::object result = nb::steal(PyObject_CallFunctionObjArgs(hook, ids.ptr(), scores.ptr(), nullptr));
        if (!result.is_valid()) throw nb::python_error();
        return result;
    }

    PyObject *logits_;
    PyObject *stop_;
};

struct GenerateOptions {
    int32_t max_tokens = 0;  // <= 0: until the context is full
    std::vector<std::string> stop;
    int32_t n_probs = -1;          // -1: no logprobs; k >= 0: the token's and the top k
    bool prompt_logprobs = false;  // also the logprobs of prompt tokens (evaluates it whole)
    Cancellation cancellation;
    std::shared_ptr<PyHooks> hooks;
    // Special tokens whose text is part of the output (a chat format's tool-call markers,
    // such as <tool_call>); other special tokens render as nothing.
    std::vector<llama_token> preserved_tokens;

    // The text `token` adds to the output.
    std::string piece(const llama_vocab *vocab, llama_token token) const {
        const bool special =
            std::find(preserved_tokens.begin(), preserved_tokens.end(), token) != preserved_tokens.end();
        return Model::piece_with(vocab, token, special);
    }
};

// Text released by one or more steps, with its tokens (and their logprobs, if asked for).
struct Chunk {
    std::string text;
    std::vector<llama_token> tokens;
    std::vector<TokenLogprob> logprobs;

    bool empty() const { return text.empty() && tokens.empty(); }
    void append(Chunk &&other) {
        text += other.text;
        tokens.insert(tokens.end(), other.tokens.begin(), other.tokens.end());
        std::move(other.logprobs.begin(), other.logprobs.end(), std::back_inserter(logprobs));
    }
};

// First index of the largest logit, as llama.cpp's greedy sampler picks it (0 if every
// logit is NaN). One pass over the row with independent lanes the compiler vectorizes, each
// keeping its maximum and the first index where it occurs: std::max_element's dependent
// compare-and-branch costs ~0.1 ms per token on a 262k vocabulary, a second pass to find the
// index another ~35 us (the row is 1 MiB, read from memory each time).
llama_token argmax(const float *logits, int32_t n) {
    constexpr int32_t lanes = 16;
    float lane_max[lanes];
    int32_t lane_index[lanes];
    std::fill(lane_max, lane_max + lanes, -INFINITY);
    std::fill(lane_index, lane_index + lanes, 0);
    const int32_t body = n - n % lanes;
    for (int32_t i = 0; i < body; i += lanes) {
        for (int32_t j = 0; j < lanes; ++j) {
            const bool greater = logits[i + j] > lane_max[j];
            lane_max[j] = greater ? logits[i + j] : lane_max[j];
            lane_index[j] = greater ? i + j : lane_index[j];
        }
    }
    float best = lane_max[0];
    int32_t index = lane_index[0];
    for (int32_t j = 1; j < lanes; ++j) {
        if (lane_max[j] > best || (lane_max[j] == best && lane_index[j] < index)) {
            best = lane_max[j];
            index = lane_index[j];
        }
    }
    for (int32_t i = body; i < n; ++i) {  // the tail comes after every lane's indices
        if (logits[i] > best) {
            best = logits[i];
            index = i;
        }
    }
    return index;
}

// A token chosen from one logits row: the row (valid until the next decode) and, when asked
// for, the token's logprob under the model's raw logits.
struct Sample {
    llama_token token = 0;
    const float *logits = nullptr;
    std::optional<TokenLogprob> logprob;
};

// One sequence's token rules. A step is two calls, so that speculative decoding can later
// verify several drafted tokens with one decode: sample() picks a token from a logits row,
// accept() applies the end rules to it and releases its text. A rejected draft is one that
// is never accepted.
class SequenceDecoder {
  public:
    SequenceDecoder(const SamplerConfig &sampling, GenerateOptions options)
        : sampling_(sampling), options_(std::move(options)), stop_(options_.stop) {}

    // Builds the sampler chain for `model` (or checks the settings of plain greedy decoding)
    // and shows it the prompt, so that bad settings raise before anything is decoded. A
    // sequence holds at most `n_ctx` tokens.
    void start(const llama_model *model, const std::vector<llama_token> &prompt, int32_t n_ctx) {
        vocab_ = llama_model_get_vocab(model);
        n_vocab_ = llama_vocab_n_tokens(vocab_);
        n_ctx_ = n_ctx;
        if (sampling_.plain_greedy()) {
            sampling_.validate(n_vocab_);
        } else {
            chain_ = sampling_.build(model, n_ctx);
            grammar_ = sampling_.build_grammar(model);
            accept_prompt(chain_.get(), prompt);
        }
        if (options_.hooks) history_ = prompt;
    }

    // Picks the next token from row `row` of `ctx`'s logits (-1: the last one), after the
    // Python logits hook, if any, rewrote them.
    Sample sample(llama_context *ctx, int32_t row) {
        float *logits = llama_get_logits_ith(ctx, row);
        if (logits == nullptr) throw LlamaError("no logits for this sequence");
        std::vector<float> raw;  // logprobs are of the model's logits, before any hook
        const bool hooked = options_.hooks && options_.hooks->has_logits_hook();
        if (hooked) {
            if (options_.n_probs >= 0) raw.assign(logits, logits + n_vocab_);
            options_.hooks->process_logits(history_, logits, n_vocab_);
        }
        Sample out;
        out.logits = logits;
        if (grammar_) {
            out.token = sample_constrained(logits);
        } else {
            out.token = chain_ ? llama_sampler_sample(chain_.get(), ctx, row) : argmax(logits, n_vocab_);
        }
        if (options_.n_probs >= 0) {
            out.logprob = logprob_of(hooked ? raw.data() : logits, n_vocab_, out.token, options_.n_probs);
        }
        return out;
    }

    // Takes `sample` as the sequence's next token and adds the text it completes to `chunk`.
    // The end of generation, a stop string, the stop hook, max_tokens or a full window (the
    // sequence holds `n_cached` tokens) ends the sequence. True: decode the token next.
    bool accept(const Sample &sample, size_t n_cached, Chunk &chunk) {
        const llama_token token = sample.token;
        if (llama_vocab_is_eog(vocab_, token)) return finish("stop", chunk);
        generated_.push_back(token);
        chunk.tokens.push_back(token);
        if (sample.logprob) chunk.logprobs.push_back(*sample.logprob);
        bool stopped = false;
        chunk.text += stop_.push(utf8_.push(options_.piece(vocab_, token)), stopped);
        if (stopped) {
            finish_reason_ = "stop";  // the text ends right before the stop string
            stop_sequence_ = stop_.matched();
            return false;
        }
        if (options_.hooks) {
            history_.push_back(token);
            // As llama-cpp-python: the token that triggered the stop is part of the text.
            if (options_.hooks->should_stop(history_, sample.logits, n_vocab_)) return finish("stop", chunk);
        }
        if (options_.max_tokens > 0 && generated_.size() >= static_cast<size_t>(options_.max_tokens)) {
            return finish("length", chunk);
        }
        if (n_cached >= static_cast<size_t>(n_ctx_)) {
            return finish("length", chunk);  // no room to decode it: stop, not sample stale logits
        }
        return true;
    }

    bool finished() const { return !finish_reason_.empty(); }
    const std::string &finish_reason() const { return finish_reason_; }
    // The stop string that ended the generation (finish reason "stop"), if one did.
    const std::optional<std::string> &stop_sequence() const { return stop_sequence_; }
    const std::vector<llama_token> &generated() const { return generated_; }
    const GenerateOptions &options() const { return options_; }

  private:
    bool finish(const std::string &reason, Chunk &chunk) {
        bool stopped = false;
        chunk.text += flush_text(stop_, utf8_, stopped);
        finish_reason_ = stopped ? "stop" : reason;
        if (stopped) stop_sequence_ = stop_.matched();
        return false;
    }

    // The chain picks from all candidates; the grammar checks that one token and, only if it
    // rejects it, constrains all candidates for the chain to pick again (llama-server's
    // common_sampler_sample). Most tokens then cost one grammar check instead of a pass of
    // the grammar over the whole vocabulary.
    llama_token sample_constrained(const float *logits) {
        const auto pick = [&](bool constrained) {
            candidates_.resize(static_cast<size_t>(n_vocab_));
            for (int32_t i = 0; i < n_vocab_; ++i) {
                candidates_[static_cast<size_t>(i)] = llama_token_data{i, logits[i], 0.0f};
            }
            llama_token_data_array all{candidates_.data(), candidates_.size(), -1, false};
            if (constrained) llama_sampler_apply(grammar_.get(), &all);
            llama_sampler_apply(chain_.get(), &all);
            if (all.selected < 0 || static_cast<size_t>(all.selected) >= all.size) {
                throw LlamaError("the sampler chain selected no token");
            }
            return all.data[all.selected].id;
        };
        llama_token token = pick(false);
        llama_token_data single{token, 1.0f, 0.0f};
        llama_token_data_array one{&single, 1, -1, false};
        llama_sampler_apply(grammar_.get(), &one);
        if (one.data[0].logit == -INFINITY) {
            token = pick(true);
        }
        llama_sampler_accept(grammar_.get(), token);
        llama_sampler_accept(chain_.get(), token);
        return token;
    }

    SamplerConfig sampling_;
    GenerateOptions options_;
    StopMatcher stop_;
    Utf8Decoder utf8_;
    SamplerPtr chain_;    // null: plain greedy, an argmax
    SamplerPtr grammar_;  // null: unconstrained
    std::vector<llama_token_data> candidates_;  // reused by sample_constrained
    const llama_vocab *vocab_ = nullptr;
    int32_t n_vocab_ = 0;
    int32_t n_ctx_ = 0;
    std::vector<llama_token> generated_;
    std::vector<llama_token> history_;  // prompt + generated, for the Python hooks
    std::string finish_reason_;
    std::optional<std::string> stop_sequence_;
};

void bind_decoding(nb::module_ &m) {
    nb::class_<GenerateOptions>(m, "GenerateOptions", "What a generation produces and when it stops.")
        .def(nb::init<>())
        .def_rw("max_tokens", &GenerateOptions::max_tokens, "<= 0: until the context is full.")
        .def_rw("stop", &GenerateOptions::stop, "Stop strings, matched on text.")
        .def_rw("n_probs", &GenerateOptions::n_probs, "-1: no logprobs; k >= 0: logprob and top k.")
        .def_rw("prompt_logprobs", &GenerateOptions::prompt_logprobs,
                "Also score the prompt's tokens (evaluates the whole prompt).")
        .def_rw("cancellation", &GenerateOptions::cancellation)
        .def_rw("preserved_tokens", &GenerateOptions::preserved_tokens,
                "Special tokens whose text is part of the output (a chat format's markers).")
        .def(
            "set_hooks",
            [](GenerateOptions &self, nb::object logits_hook, nb::object stop_hook) {
                self.hooks = (logits_hook.is_none() && stop_hook.is_none())
                                 ? nullptr
                                 : std::make_shared<PyHooks>(std::move(logits_hook), std::move(stop_hook));
            },
            "logits_hook"_a.none(), "stop_hook"_a.none(),
            "Per-token Python hooks, called as hook(token_ids, logits) over memoryviews (slow path).")
        .def_prop_ro(
            "has_hooks", [](const GenerateOptions &self) { return self.hooks != nullptr; },
            "Whether Python hooks are set (they cannot run in another process).");

    nb::class_<Chunk>(m, "Chunk", "Text released by one or more steps, with its tokens and their logprobs.")
        .def(
            "__init__",
            [](Chunk *self, std::string text, std::vector<llama_token> tokens, std::vector<TokenLogprob> logprobs) {
                new (self) Chunk{std::move(text), std::move(tokens), std::move(logprobs)};
            },
            "text"_a, "tokens"_a, "logprobs"_a, "One produced elsewhere (a child process of an IsolatedPool).")
        .def_ro("text", &Chunk::text)
        .def_ro("tokens", &Chunk::tokens)
        .def_ro("logprobs", &Chunk::logprobs);
}

// =====================================================================================
// MoE: expert-routing profiler
// =====================================================================================
//
// Counts the experts llama.cpp's router picks for every token it routes, read from the
// `ffn_moe_topk-<layer>` tensors that build_moe_ffn names (I32, [n_expert_used, n_tokens]: a
// view of the router's argsort) through the scheduler's eval callback
// (llama_context_params.cb_eval). The callback asks for those tensors only, so the scheduler
// cuts the graph just after each of them and nowhere else; it copies their rows (from the
// device when they are not in host memory) and counts them in the decoding thread, with no
// GIL. It only reads: outputs are unchanged on CPU (tested); on a GPU the split after the
// router can change the kernels chosen for the MoE block (not verified there).
//
// llama.cpp computes the last layer's feed-forward only for the rows whose outputs were asked
// for (build_inp_out_ids: the get_rows before that layer's FFN): that layer routes fewer
// tokens than the others, hence a token count per layer. The trace puts those rows at their
// tokens by reading the `out_ids` input of that get_rows.
//
// The trace is allocated when the context is created: N x n_layer x n_expert_used x 4 bytes,
// at most expert_trace_max_bytes (create() refuses more before allocating anything).

// The most memory a routing trace may take (profile_experts_trace), in bytes.
constexpr uint64_t expert_trace_max_bytes = uint64_t{1} << 30;

// An integer of the model's GGUF metadata (`<architecture>.<name>`), or `fallback`.
int64_t model_arch_int(const llama_model *model, const char *name, int64_t fallback) {
    char buf[128];
    if (llama_model_meta_val_str(model, "general.architecture", buf, sizeof(buf)) < 0) return fallback;
    const std::string key = std::string(buf) + "." + name;
    if (llama_model_meta_val_str(model, key.c_str(), buf, sizeof(buf)) < 0) return fallback;
    char *end = nullptr;
    const long long value = std::strtoll(buf, &end, 10);
    return end == buf ? fallback : static_cast<int64_t>(value);
}

// What a profiler has counted, copied out under its lock. Rows are the MoE layers that have
// routed tokens, in layer order.
struct ExpertSnapshot {
    std::vector<int32_t> layers;  // the model layer of each row
    std::vector<int64_t> counts;  // rows x n_expert: tokens routed to each expert
    std::vector<int64_t> tokens;  // rows: tokens routed by each layer
    std::vector<int32_t> trace;   // n_trace x rows x n_expert_used, oldest first; -1: not routed
    size_t n_trace = 0;
    int64_t trace_total = 0;  // tokens that entered the trace, kept or since dropped
};

class ExpertProfiler {
  public:
    // `trace_capacity`: tokens the routing trace keeps (a ring buffer: the latest ones); 0: none.
    ExpertProfiler(int32_t n_layer, int32_t n_expert, int32_t n_expert_used, size_t trace_capacity)
        : n_layer_(n_layer), n_expert_(n_expert), n_expert_used_(n_expert_used), trace_capacity_(trace_capacity),
          counts_(static_cast<size_t>(n_layer) * static_cast<size_t>(n_expert), 0),
          tokens_(static_cast<size_t>(n_layer), 0), moe_layer_(static_cast<size_t>(n_layer), 0),
          trace_(trace_capacity * static_cast<size_t>(n_layer) * static_cast<size_t>(n_expert_used), -1) {}

    ExpertProfiler(const ExpertProfiler &) = delete;
    ExpertProfiler &operator=(const ExpertProfiler &) = delete;

    // The profiler of a context of `model` created with `enabled` and `trace_capacity`, or
    // nullptr when profiling is off or the model has no experts. `expert_used_override`: the
    // model's kv_override of expert_used_count (-1: none), which llama.cpp routes with.
    // Throws InvalidArgumentError for a trace over expert_trace_max_bytes.
    static std::shared_ptr<ExpertProfiler> create(const llama_model *model, int64_t expert_used_override,
                                                  bool enabled, int64_t trace_capacity) {
        if (!enabled) return nullptr;
        if (trace_capacity < 0) throw InvalidArgumentError("profile_experts_trace must be >= 0");
        // llama_model_n_expert is the loaded hparam (overrides applied); there is no such
        // getter for expert_used_count.
        const int64_t n_expert = llama_model_n_expert(model);
        const int64_t n_used =
            expert_used_override >= 0 ? expert_used_override : model_arch_int(model, "expert_used_count", 0);
        if (n_expert <= 0 || n_used <= 0 || n_used > n_expert) return nullptr;
        const int32_t n_layer = llama_model_n_layer(model);
        // Bytes a token takes: small (layers x top-k x 4), so the division below cannot
        // overflow where trace_capacity x token_bytes could.
        const uint64_t token_bytes =
            static_cast<uint64_t>(std::max(n_layer, 1)) * static_cast<uint64_t>(n_used) * sizeof(int32_t);
        const uint64_t max_tokens = expert_trace_max_bytes / token_bytes;
        if (static_cast<uint64_t>(trace_capacity) > max_tokens) {
            throw InvalidArgumentError(
                "profile_experts_trace=" + std::to_string(trace_capacity) + " is too large: the trace takes " +
                std::to_string(token_bytes) + " bytes a token (n_layer " + std::to_string(n_layer) +
                " x n_expert_used " + std::to_string(n_used) + " x 4) and is limited to 1 GiB (" +
                std::to_string(expert_trace_max_bytes) + " bytes): at most " + std::to_string(max_tokens) +
                " tokens for this model");
        }
        return std::make_shared<ExpertProfiler>(n_layer, static_cast<int32_t>(n_expert), static_cast<int32_t>(n_used),
                                                static_cast<size_t>(trace_capacity));
    }

    // Points llama.cpp's eval callback at `profiler` (if any); it must outlive the context.
    static void attach(llama_context_params &params, ExpertProfiler *profiler) {
        if (profiler == nullptr) return;
        params.cb_eval = eval_callback;
        params.cb_eval_user_data = profiler;
    }

    int32_t n_expert() const { return n_expert_; }
    int32_t n_expert_used() const { return n_expert_used_; }
    size_t trace_capacity() const { return trace_capacity_; }

    // A copy of everything counted; with `reset`, the counters are also zeroed under the same
    // lock, so that no token routed meanwhile is lost between the copy and the reset.
    ExpertSnapshot snapshot(bool reset) {
        std::lock_guard<std::mutex> lock(mutex_);
        ExpertSnapshot s = snapshot_locked();
        if (reset) reset_locked();
        return s;
    }

    // Forgets everything counted. A ubatch being decoded meanwhile is counted from its next
    // layer on.
    void reset() {
        std::lock_guard<std::mutex> lock(mutex_);
        reset_locked();
    }

  private:
    static constexpr std::string_view topk_prefix = "ffn_moe_topk-";

    ExpertSnapshot snapshot_locked() const {
        ExpertSnapshot s;
        for (int32_t l = 0; l < n_layer_; ++l) {
            if (!moe_layer_[static_cast<size_t>(l)]) continue;
            s.layers.push_back(l);
            const auto row = counts_.begin() + static_cast<std::ptrdiff_t>(l) * n_expert_;
            s.counts.insert(s.counts.end(), row, row + n_expert_);
            s.tokens.push_back(tokens_[static_cast<size_t>(l)]);
        }
        s.trace_total = trace_total_;
        if (trace_capacity_ == 0) return s;
        const int64_t first = std::max<int64_t>(0, trace_total_ - static_cast<int64_t>(trace_capacity_));
        s.n_trace = static_cast<size_t>(trace_total_ - first);
        s.trace.reserve(s.n_trace * s.layers.size() * static_cast<size_t>(n_expert_used_));
        for (int64_t g = first; g < trace_total_; ++g) {
            for (const int32_t l : s.layers) {
                const int32_t *slot = trace_slot(g, l);
                s.trace.insert(s.trace.end(), slot, slot + n_expert_used_);
            }
        }
        return s;
    }

    void reset_locked() {
        std::fill(counts_.begin(), counts_.end(), 0);
        std::fill(tokens_.begin(), tokens_.end(), 0);
        std::fill(moe_layer_.begin(), moe_layer_.end(), 0);
        std::fill(trace_.begin(), trace_.end(), -1);
        trace_total_ = 0;
        last_layer_ = -1;
    }

    // The layer of a `ffn_moe_topk-<layer>` tensor, or -1 for any other tensor.
    static int32_t topk_layer(const ggml_tensor *t) {
        const std::string_view name(t->name);
        if (t->type != GGML_TYPE_I32 || name.substr(0, topk_prefix.size()) != topk_prefix) return -1;
        int32_t layer = 0;
        for (const char c : name.substr(topk_prefix.size())) {
            if (c < '0' || c > '9' || layer > 1'000'000) return -1;
            layer = layer * 10 + (c - '0');
        }
        return name.size() > topk_prefix.size() ? layer : -1;
    }

    // ggml_backend_sched_eval_callback: `ask` asks whether the callback wants `t`'s data (then
    // the scheduler computes up to `t` and calls again with ask=false). Returning false on the
    // second call would stop the computation.
    static bool eval_callback(ggml_tensor *t, bool ask, void *data) {
        const int32_t layer = topk_layer(t);
        if (ask) return layer >= 0;
        if (layer >= 0) static_cast<ExpertProfiler *>(data)->add(t, layer);
        return true;
    }

    // The `out_ids` input of the get_rows that kept only the output rows before `t`'s layer,
    // looked for among `t`'s sources (a few nodes back: norm, router, softmax, argsort).
    static const ggml_tensor *find_out_ids(const ggml_tensor *t) {
        std::vector<const ggml_tensor *> todo{t};
        std::vector<const ggml_tensor *> seen;
        while (!todo.empty() && seen.size() < 256) {
            const ggml_tensor *node = todo.back();
            todo.pop_back();
            if (node == nullptr || std::find(seen.begin(), seen.end(), node) != seen.end()) continue;
            seen.push_back(node);
            if (node->op == GGML_OP_GET_ROWS && node->src[1] != nullptr &&
                std::string_view(node->src[1]->name) == "out_ids") {
                return node->src[1];
            }
            for (const ggml_tensor *src : node->src) todo.push_back(src);
        }
        return nullptr;
    }

    // Copies `t`'s bytes unless they are in host memory; returns where to read them.
    const char *tensor_bytes(const ggml_tensor *t, std::vector<char> &scratch) {
        if (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer)) {
            return static_cast<const char *>(t->data);
        }
        scratch.resize(ggml_nbytes(t));
        ggml_backend_tensor_get(t, scratch.data(), 0, scratch.size());
        return scratch.data();
    }

    int32_t *trace_slot(int64_t token, int32_t layer) {
        const size_t ring = static_cast<size_t>(token % static_cast<int64_t>(trace_capacity_));
        return trace_.data() + (ring * static_cast<size_t>(n_layer_) + static_cast<size_t>(layer)) *
                                   static_cast<size_t>(n_expert_used_);
    }
    const int32_t *trace_slot(int64_t token, int32_t layer) const {
        return const_cast<ExpertProfiler *>(this)->trace_slot(token, layer);
    }

    // Runs in the decoding thread (the context's one owner), between two graph chunks.
    void add(const ggml_tensor *t, int32_t layer) {
        if (layer >= n_layer_ || t->ne[0] < 1 || t->ne[0] > n_expert_ || t->ne[2] != 1 || t->ne[3] != 1) {
            warn_once(t, "is not [k <= n_expert, n_tokens] in a layer of the model: not counted");
            return;
        }
        // The top-k llama.cpp routed with; n_expert_used_ is what create() resolved. Should they
        // differ (an override the profiler did not see), the counts still follow the tensor
        // and only the trace, whose slots are n_expert_used_ wide, leaves the rows out.
        const int64_t k = t->ne[0];
        const bool traced = k == n_expert_used_;
        if (!traced) warn_once(t, "routes a different top-k than expert_used_count: left out of the trace");
        const int64_t n_rows = t->ne[1];
        const char *base = tensor_bytes(t, data_);
        if (base == nullptr) return;

        std::lock_guard<std::mutex> lock(mutex_);
        // Layers come in order within a ubatch: one not after the last seen starts the next.
        const bool new_ubatch = last_layer_ < 0 || layer <= last_layer_;
        last_layer_ = layer;
        if (new_ubatch) {
            ubatch_first_ = trace_total_;
            ubatch_tokens_ = n_rows;
            trace_total_ += n_rows;
            if (trace_capacity_ > 0) {
                const int64_t kept = std::max(ubatch_first_, trace_total_ - static_cast<int64_t>(trace_capacity_));
                for (int64_t g = kept; g < trace_total_; ++g) {
                    std::fill_n(trace_slot(g, 0), static_cast<size_t>(n_layer_) * static_cast<size_t>(n_expert_used_),
                                -1);
                }
            }
        }
        // A layer that routed only the output rows: the token in the ubatch of each row.
        const ggml_tensor *out_ids = nullptr;
        if (trace_capacity_ > 0 && !new_ubatch && n_rows < ubatch_tokens_) {
            out_ids = find_out_ids(t);
            if (out_ids != nullptr && out_ids->type == GGML_TYPE_I32 && out_ids->ne[0] == n_rows) {
                const auto *ids = reinterpret_cast<const int32_t *>(tensor_bytes(out_ids, ids_bytes_));
                out_ids_.assign(ids, ids + n_rows);
            } else {
                out_ids = nullptr;  // those rows stay out of the trace
            }
        }
        moe_layer_[static_cast<size_t>(layer)] = 1;
        tokens_[static_cast<size_t>(layer)] += n_rows;
        int64_t *counts = counts_.data() + static_cast<size_t>(layer) * static_cast<size_t>(n_expert_);
        const int64_t oldest_kept = trace_total_ - static_cast<int64_t>(trace_capacity_);
        for (int64_t i = 0; i < n_rows; ++i) {
            const char *row = base + static_cast<size_t>(i) * t->nb[1];
            int64_t token = -1;  // its index in the trace
            if (trace_capacity_ > 0 && traced) {
                const int64_t at = n_rows == ubatch_tokens_ ? i : (out_ids != nullptr ? out_ids_[static_cast<size_t>(i)] : -1);
                if (at >= 0 && at < ubatch_tokens_ && ubatch_first_ + at >= oldest_kept) token = ubatch_first_ + at;
            }
            int32_t *slot = token >= 0 ? trace_slot(token, layer) : nullptr;
            for (int64_t j = 0; j < k; ++j) {
                int32_t expert = 0;
                std::memcpy(&expert, row + static_cast<size_t>(j) * t->nb[0], sizeof(expert));
                if (expert < 0 || expert >= n_expert_) continue;
                ++counts[expert];
                if (slot != nullptr) slot[j] = expert;
            }
        }
    }

    // Logs (once per profiler, outside mutex_: logging may take the GIL) that `t` was not
    // counted as it should.
    void warn_once(const ggml_tensor *t, const char *what) {
        if (warned_.exchange(true)) return;
        emit_log_line(GGML_LOG_LEVEL_WARN, "expert profiler: " + std::string(t->name) + " [" +
                                               std::to_string(t->ne[0]) + ", " + std::to_string(t->ne[1]) + ", " +
                                               std::to_string(t->ne[2]) + ", " + std::to_string(t->ne[3]) + "] " +
                                               what + " (n_expert " + std::to_string(n_expert_) +
                                               ", n_expert_used " + std::to_string(n_expert_used_) + ")");
    }

    const int32_t n_layer_, n_expert_, n_expert_used_;
    const size_t trace_capacity_;
    std::atomic<bool> warned_{false};

    // Decoding thread only: copies of device tensors.
    std::vector<char> data_;
    std::vector<char> ids_bytes_;
    std::vector<int32_t> out_ids_;

    // Written by add() in the decoding thread, read by snapshot() from any thread: `mutex_`
    // is held to add one tensor's rows or to copy everything out, never while decoding.
    mutable std::mutex mutex_;
    std::vector<int64_t> counts_;     // n_layer x n_expert
    std::vector<int64_t> tokens_;     // n_layer
    std::vector<char> moe_layer_;     // n_layer: the layer has routed tokens
    std::vector<int32_t> trace_;      // trace_capacity x n_layer x n_expert_used, a ring
    int64_t trace_total_ = 0;         // the trace index of the next token
    int32_t last_layer_ = -1;         // the layer of the last topk tensor (-1: none since reset)
    int64_t ubatch_first_ = 0;        // the trace index of the current ubatch's first token
    int64_t ubatch_tokens_ = 0;       // tokens in the current ubatch
};

void bind_experts(nb::module_ &m) {
    m.attr("EXPERT_TRACE_MAX_BYTES") = expert_trace_max_bytes;
    nb::class_<ExpertProfiler>(
        m, "ExpertProfiler",
        "Counts of the experts a MoE model's router picks, collected during llama_decode (see llama_cpp.experts).")
        .def_prop_ro("n_expert", &ExpertProfiler::n_expert)
        .def_prop_ro("n_expert_used", &ExpertProfiler::n_expert_used)
        .def_prop_ro("trace_capacity", &ExpertProfiler::trace_capacity, "Tokens the routing trace keeps (0: no trace).")
        .def(
            "snapshot",
            [](ExpertProfiler &self, bool reset) {
                ExpertSnapshot s;
                {
                    nb::gil_scoped_release release;
                    s = self.snapshot(reset);
                }
                const size_t rows = s.layers.size();
                const auto n_expert = static_cast<size_t>(self.n_expert());
                const auto k = static_cast<size_t>(self.n_expert_used());
                return std::make_tuple(owned_array<int32_t, 1>(std::move(s.layers), {rows}),
                                       owned_array<int64_t, 2>(std::move(s.counts), {rows, n_expert}),
                                       owned_array<int64_t, 1>(std::move(s.tokens), {rows}),
                                       owned_array<int32_t, 3>(std::move(s.trace), {s.n_trace, rows, k}),
                                      s.trace_total);
            },
            "reset"_a = false,
            "(layers int32[rows], counts int64[rows, n_expert], tokens int64[rows], "
            "trace int32[n_trace, rows, n_expert_used], trace_total): copies, rows being the MoE layers "
            "that routed tokens. reset=True also forgets everything counted, under the same lock as the "
            "copy: no token falls between the two.")
        .def("reset", &ExpertProfiler::reset, nb::call_guard<nb::gil_scoped_release>(), "Forget everything counted.");
}

// =====================================================================================
// Context
// =====================================================================================

// A call would wait for an owner that cannot let go before it returns: a stream open in the
// calling thread, or the generation whose hook made the call. Also raised by a stream that
// lost the context after it was left unread past stream_timeout.
struct ContextBusyError : LlamaError {
    using LlamaError::LlamaError;
};
PyObject *py_context_busy_error = nullptr;

// Raises InvalidArgumentError for a token id outside the vocabulary.
void check_token_ids(const llama_vocab *vocab, const std::vector<llama_token> &tokens) {
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw InvalidArgumentError("token id " + std::to_string(t) + " is out of range [0, " +
                                       std::to_string(n_vocab) + ")");
        }
    }
}

struct ContextDeleter {
    void operator()(llama_context *ctx) const {
        llama_free(ctx);
        release_free_memory();
    }
};
struct BatchOwner {
    llama_batch batch{};
    int32_t capacity = 0;
    BatchOwner() = default;
    explicit BatchOwner(int32_t n) : batch(llama_batch_init(n, 0, 1)), capacity(n) {}
    BatchOwner(const BatchOwner &) = delete;
    BatchOwner &operator=(const BatchOwner &) = delete;
    ~BatchOwner() {
        if (capacity > 0) llama_batch_free(batch);
    }
};

struct ContextOptions {
    uint32_t n_ctx = 512;
    uint32_t n_batch = 512;
    uint32_t n_ubatch = 512;
    int32_t n_threads = 0;        // 0: llama.cpp's default
    int32_t n_threads_batch = 0;  // 0: llama.cpp's default
    int32_t flash_attn = -1;      // -1 auto, 0 off, 1 on
    bool offload_kqv = true;
    bool embeddings = false;
    float rope_freq_base = 0.0f;
    float rope_freq_scale = 0.0f;
    int32_t rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED;
    float yarn_ext_factor = -1.0f;
    float yarn_attn_factor = -1.0f;
    float yarn_beta_fast = -1.0f;
    float yarn_beta_slow = -1.0f;
    uint32_t yarn_orig_ctx = 0;
    int32_t pooling_type = LLAMA_POOLING_TYPE_UNSPECIFIED;
    int32_t type_k = -1;  // -1: llama.cpp's default (f16)
    int32_t type_v = -1;
    uint32_t n_seq_max = 1;
    bool kv_unified = false;
    bool verbose = true;  // false: llama.cpp logs only errors while creating the context
    bool profile_experts = false;      // count the experts a MoE model routes tokens to
    int64_t profile_experts_trace = 0;  // ... and keep the routing of the last N tokens
    double stream_timeout = 60.0;  // seconds a paused stream may keep other calls waiting
};

struct PerfData {
    double t_load_ms, t_prompt_ms, t_eval_ms;
    int32_t n_prompt, n_eval, n_reused;
};

// Everything one llama_context owns. Shared by the Context object and any TokenStream made
// from it, so a stream can never outlive the memory it decodes into.
struct ContextState {
    // Who uses the context: one call, or one stream from its first step to its end (see
    // ContextLock and TokenStream). `mutex` guards these fields and is held only briefly:
    // never while decoding or freeing, never while waiting for the GIL.
    std::mutex mutex;
    std::condition_variable released;  // the owner let go or paused
    const void *owner = nullptr;       // the ContextLock or TokenStream using the context
    std::thread::id owner_thread;      // the thread running it, or that ran a stream's last step
    bool owner_running = false;        // inside a call or a stream's step
    bool owner_is_stream = false;
    std::chrono::steady_clock::time_point idle_since;  // a paused stream's last step ended then
    std::chrono::milliseconds stream_timeout{60000};   // a paused stream may keep others waiting

    ModelHandle model;
    const llama_vocab *vocab = nullptr;
    std::unique_ptr<llama_context, ContextDeleter> ctx;
    std::unique_ptr<BatchOwner> batch;  // reused for every decode
    std::vector<llama_token> tokens;    // the tokens of sequence 0 now in the KV cache
    bool logits_ready = false;          // the last decode's logits belong to tokens.back()
    std::atomic<bool> abort{false};     // read by llama.cpp's abort callback
    std::shared_ptr<std::atomic<bool>> cancel;  // the running generation's flag, if any
    LoraSet loras;  // applied, with their scales
    std::shared_ptr<ExpertProfiler> experts;  // llama.cpp's eval callback writes to it; null: off

    // The context refers to the adapters and the model: free it first, whatever the
    // declaration order says.
    ~ContextState() { free_all(); }
    std::atomic<bool> closing{false};

    llama_context *get() const {
        if (!ctx) throw ClosedError("the context is closed");
        return ctx.get();
    }

    // Makes `who` the owner, waiting for the current one to let go (call with the GIL
    // released). A stream paused longer than stream_timeout is revoked: its next step raises.
    // Waiting for this very thread could never end: that raises ContextBusyError.
    void acquire(std::unique_lock<std::mutex> &lock, const void *who, bool stream) {
        const auto me = std::this_thread::get_id();
        while (owner != nullptr) {
            if (owner_thread == me) {
                throw ContextBusyError(
                    owner_running ? "this context is running a generation on this thread: a hook may only read "
                                    "from it (n_ctx(), n_tokens, ...), not start another call"
                                  : "this thread holds an open stream on this context: read it to the end or "
                                    "close it first");
            }
            if (owner_is_stream && !owner_running) {
                const auto deadline = idle_since + stream_timeout;
                if (std::chrono::steady_clock::now() >= deadline) {
                    owner = nullptr;  // revoked
                    break;
                }
                released.wait_until(lock, deadline);
            } else {
                released.wait(lock);
            }
        }
        if (closing.load() || !ctx) throw ClosedError("the context is closed");
        owner = who;
        owner_thread = me;
        owner_running = true;
        owner_is_stream = stream;
    }

    // A stream's step starts (maybe on another thread than the last one) or ends.
    void resume() {
        owner_thread = std::this_thread::get_id();
        owner_running = true;
    }
    void pause() {
        owner_running = false;
        idle_since = std::chrono::steady_clock::now();
        released.notify_all();  // waiters start counting the stream's idle time
    }

    // `who` lets go. If the context was closed meanwhile (close() from inside a hook), it is
    // freed first, by this owner, with the mutex unlocked (llama_free may log).
    void release(std::unique_lock<std::mutex> &lock, const void *who) {
        if (owner != who) return;
        if (closing.load() && ctx) {
            owner_running = true;
            lock.unlock();
            free_all();
            lock.lock();
        }
        owner = nullptr;
        owner_running = false;
        released.notify_all();
    }

    void free_all() {
        ctx.reset();
        batch.reset();
        tokens.clear();
        loras.clear();
        model.reset();
    }

    int32_t n_ctx() const { return static_cast<int32_t>(llama_n_ctx(get())); }

    // The KV position, read back from llama.cpp rather than mirrored.
    int32_t n_past() const {
        llama_pos pos = llama_memory_seq_pos_max(llama_get_memory(get()), 0);
        return pos < 0 ? 0 : pos + 1;
    }

    void clear() {
        llama_memory_clear(llama_get_memory(get()), true);
        tokens.clear();
        logits_ready = false;
    }

    void check_tokens(const std::vector<llama_token> &toks) const { check_token_ids(vocab, toks); }

    // llama_decode returned 2: the abort callback fired, because the context is closing or
    // because the running call was cancelled.
    [[noreturn]] void throw_aborted(const std::string &what) const {
        if (closing.load()) {
            throw ClosedError(what + " was aborted because the context is closing");
        }
        throw CancelledError(what + " was cancelled");
    }

    // Decodes `toks` at the end of sequence 0 in n_batch chunks, logits for the last token
    // only. On failure the cache is cleared so that it never holds a half-evaluated prompt.
    //
    // With `prompt_logprobs`, every token's logits are computed and turned, chunk by chunk,
    // into the logprob of the token that follows it (top `k` alternatives included).
    void decode(const llama_token *toks, size_t count, std::vector<TokenLogprob> *prompt_logprobs = nullptr,
                int32_t k = 0) {
        llama_context *c = get();
        const int32_t n_batch = batch->capacity;
        for (size_t start = 0; start < count; start += static_cast<size_t>(n_batch)) {
            const auto n = static_cast<int32_t>(std::min<size_t>(n_batch, count - start));
            llama_batch &b = batch->batch;
            const auto pos0 = static_cast<llama_pos>(tokens.size());
            for (int32_t i = 0; i < n; ++i) {
                b.token[i] = toks[start + static_cast<size_t>(i)];
                b.pos[i] = pos0 + i;
                b.n_seq_id[i] = 1;
                b.seq_id[i][0] = 0;
                b.logits[i] = (prompt_logprobs != nullptr || start + static_cast<size_t>(i) == count - 1) ? 1 : 0;
            }
            b.n_tokens = n;
            const int32_t rc = llama_decode(c, b);
            if (rc != 0) {
                clear();
                if (rc == 1) {
                    throw ContextOverflowError("no room left in the KV cache (n_ctx=" +
                                               std::to_string(n_ctx()) + ")");
                }
                if (rc == 2) {
                    throw_aborted("the generation");
                }
                throw DecodeError("llama_decode failed with code " + std::to_string(rc));
            }
            tokens.insert(tokens.end(), toks + start, toks + start + static_cast<size_t>(n));
            logits_ready = true;
            if (prompt_logprobs != nullptr) {
                const int32_t n_vocab = llama_vocab_n_tokens(vocab);
                for (int32_t i = 0; i < n; ++i) {
                    const size_t next = start + static_cast<size_t>(i) + 1;
                    if (next < count) {
                        prompt_logprobs->push_back(logprob_of(llama_get_logits_ith(c, i), n_vocab, toks[next], k));
                    }
                }
            }
        }
    }

    // Makes sequence 0 hold `prompt`, reusing the longest cached prefix. At least the last
    // prompt token is always evaluated, so fresh logits exist for sampling. Returns the
    // number of prompt tokens that were reused.
    // With `prompt_logprobs` the whole prompt is evaluated (no reuse) to score every token.
    size_t load_prompt(const std::vector<llama_token> &prompt, std::vector<TokenLogprob> *prompt_logprobs = nullptr,
                       int32_t k = 0) {
        if (prompt.empty()) {
            throw InvalidArgumentError("the prompt is empty (no tokens)");
        }
        check_tokens(prompt);
        const auto limit = static_cast<size_t>(n_ctx());
        if (prompt.size() > limit) {
            throw ContextOverflowError("the prompt has " + std::to_string(prompt.size()) +
                                       " tokens, more than the context window of " +
                                       std::to_string(limit));
        }
        size_t keep = 0;
        while (keep < tokens.size() && keep < prompt.size() && tokens[keep] == prompt[keep]) {
            ++keep;
        }
        keep = prompt_logprobs != nullptr ? 0 : std::min(keep, prompt.size() - 1);
        if (keep < tokens.size()) {
            // Partial removal can fail (e.g. recurrent or sliding-window caches); start over.
            if (keep == 0 || !llama_memory_seq_rm(llama_get_memory(get()), 0,
                                                  static_cast<llama_pos>(keep), -1)) {
                clear();
                keep = 0;
            } else {
                tokens.resize(keep);
                logits_ready = false;
            }
        }
        decode(prompt.data() + keep, prompt.size() - keep, prompt_logprobs, k);
        return keep;
    }
};

bool abort_callback(void *data) {
    const auto *state = static_cast<ContextState *>(data);
    return state->abort.load(std::memory_order_relaxed) ||
           (state->cancel && state->cancel->load(std::memory_order_relaxed));
}

enum class Access { read, write };

// Makes the calling thread the context's owner for its scope; taken with the GIL released.
// A read beside this thread's own paused stream, or from inside a hook of its running
// generation, goes ahead without waiting: that owner is stopped in this very thread.
class ContextLock {
  public:
    explicit ContextLock(ContextState &state, Access access = Access::write) : state_(state) {
        std::unique_lock<std::mutex> lock(state.mutex);
        if (access == Access::read && state.owner != nullptr && state.owner_thread == std::this_thread::get_id()) {
            if (state.closing.load() || !state.ctx) throw ClosedError("the context is closed");
            return;
        }
        state.acquire(lock, this, false);
        owner_ = true;
    }
    ContextLock(const ContextLock &) = delete;
    ContextLock &operator=(const ContextLock &) = delete;
    ~ContextLock() {
        if (!owner_) return;
        std::unique_lock<std::mutex> lock(state_.mutex);
        state_.release(lock, this);
    }

  private:
    ContextState &state_;
    bool owner_ = false;
};

// llama.cpp's parameters for a context with `options` (the abort callback is the caller's).
llama_context_params context_params(const ContextOptions &options) {
    if (options.n_batch == 0) throw InvalidArgumentError("n_batch must be >= 1");
    llama_context_params params = llama_context_default_params();
    params.n_ctx = options.n_ctx;
    params.n_batch = options.n_batch;
    params.n_ubatch = std::min(options.n_ubatch == 0 ? options.n_batch : options.n_ubatch, options.n_batch);
    if (options.n_threads > 0) params.n_threads = options.n_threads;
    if (options.n_threads_batch > 0) params.n_threads_batch = options.n_threads_batch;
    params.flash_attn_type = options.flash_attn < 0   ? LLAMA_FLASH_ATTN_TYPE_AUTO
                             : options.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                                       : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    params.offload_kqv = options.offload_kqv;
    params.embeddings = options.embeddings;
    params.rope_freq_base = options.rope_freq_base;
    params.rope_freq_scale = options.rope_freq_scale;
    params.rope_scaling_type = static_cast<llama_rope_scaling_type>(options.rope_scaling_type);
    params.yarn_ext_factor = options.yarn_ext_factor;
    if (options.yarn_attn_factor >= 0.0f) params.yarn_attn_factor = options.yarn_attn_factor;
    if (options.yarn_beta_fast >= 0.0f) params.yarn_beta_fast = options.yarn_beta_fast;
    if (options.yarn_beta_slow >= 0.0f) params.yarn_beta_slow = options.yarn_beta_slow;
    params.yarn_orig_ctx = options.yarn_orig_ctx;
    params.pooling_type = static_cast<enum llama_pooling_type>(options.pooling_type);
    if (options.type_k >= 0) params.type_k = static_cast<ggml_type>(options.type_k);
    if (options.type_v >= 0) params.type_v = static_cast<ggml_type>(options.type_v);
    // llama.cpp reserves max(outputs, n_seq_max) output rows and asserts that they fit in
    // n_batch: more sequences than n_batch would abort the process.
    params.n_seq_max = std::clamp<uint32_t>(options.n_seq_max, 1, options.n_batch);
    params.kv_unified = options.kv_unified;
    params.no_perf = false;
    return params;
}

// What Context::embed computed, turned into numpy arrays by its binding once the GIL is back.
struct Embeddings {
    size_t width = 0;       // floats per vector: n_embd, or n_cls_out with rank pooling
    bool per_token = false;  // pooling NONE
    // Pooled: one buffer of n_inputs x width. Per token: one n_tokens_i x width buffer per input.
    std::vector<std::vector<float>> buffers;
};

// The tokens llama-server scores for a query/document pair (format_prompt_rerank at the
// pinned llama.cpp): the model's "rerank" template with {query} and {document} filled in,
// tokenized with special tokens parsed; otherwise BOS query EOS SEP document EOS, each
// special token only where the vocabulary adds it (SEP stands in for a missing EOS).
std::vector<llama_token> rerank_prompt(const llama_model *model, const llama_vocab *vocab, const std::string &query,
                                       const std::string &document) {
    if (const char *tmpl = llama_model_chat_template(model, "rerank")) {
        // One pass, so that a query containing "{document}" is not filled in a second time.
        std::string prompt;
        const std::string_view text(tmpl);
        size_t i = 0;
        while (i < text.size()) {
            if (text.compare(i, 7, "{query}") == 0) {
                prompt += query;
                i += 7;
            } else if (text.compare(i, 10, "{document}") == 0) {
                prompt += document;
                i += 10;
            } else {
                prompt += text[i++];
            }
        }
        return Model::tokenize_with(vocab, prompt, false, true);
    }
    llama_token eos = llama_vocab_eos(vocab);
    if (eos == LLAMA_TOKEN_NULL) eos = llama_vocab_sep(vocab);
    std::vector<llama_token> out;
    if (llama_vocab_get_add_bos(vocab)) out.push_back(llama_vocab_bos(vocab));
    const auto q = Model::tokenize_with(vocab, query, false, false);
    out.insert(out.end(), q.begin(), q.end());
    if (llama_vocab_get_add_eos(vocab)) out.push_back(eos);
    if (llama_vocab_get_add_sep(vocab)) out.push_back(llama_vocab_sep(vocab));
    const auto d = Model::tokenize_with(vocab, document, false, false);
    out.insert(out.end(), d.begin(), d.end());
    if (llama_vocab_get_add_eos(vocab)) out.push_back(eos);
    return out;
}

class Context {
  public:
    Context(const Model &model, const ContextOptions &options) : state_(std::make_shared<ContextState>()) {
        QuietScope quiet(!options.verbose);
        state_->model = model.handle();
        state_->vocab = llama_model_get_vocab(state_->model.get());
        llama_context_params params = context_params(options);
        params.abort_callback = abort_callback;
        params.abort_callback_data = state_.get();
        state_->experts =
            ExpertProfiler::create(state_->model.get(), model.expert_used_override(), options.profile_experts,
                                   options.profile_experts_trace);
        ExpertProfiler::attach(params, state_->experts.get());

        tl_last_errors.clear();
        llama_context *ctx = llama_init_from_model(state_->model.get(), params);
        if (ctx == nullptr) {
            const std::string reason = last_errors_or("see the llama_cpp log");
            throw LlamaError("failed to create a context: " + reason);
        }
        state_->ctx.reset(ctx);
        state_->batch = std::make_unique<BatchOwner>(static_cast<int32_t>(llama_n_batch(ctx)));
        state_->stream_timeout = std::chrono::milliseconds(static_cast<int64_t>(options.stream_timeout * 1000.0));
        embeddings_ = options.embeddings;
    }

    const std::shared_ptr<ContextState> &state() const { return state_; }

    // Null unless created with profile_experts on a MoE model. Stays readable after close().
    std::shared_ptr<ExpertProfiler> expert_profiler() const { return state_->experts; }

    // Waits for the call in flight (asking it to stop at the next token or decode step),
    // revokes a paused stream, then frees the context. Safe to call twice and from any
    // thread; from inside a hook of the running generation, that generation raises
    // ClosedError and frees the context as it ends.
    void close() {
        state_->closing.store(true);
        state_->abort.store(true);
        std::unique_lock<std::mutex> lock(state_->mutex);
        if (state_->owner != nullptr && state_->owner_running &&
            state_->owner_thread == std::this_thread::get_id()) {
            return;
        }
        state_->released.wait(lock, [&] { return state_->owner == nullptr || !state_->owner_running; });
        state_->owner = this;
        state_->resume();
        state_->release(lock, this);
    }

    bool closed() const { return state_->closing.load(); }

    int32_t n_ctx() {
        ContextLock lock(*state_, Access::read);
        return state_->n_ctx();
    }

    MemoryBreakdown memory_use() {
        ContextLock lock(*state_, Access::read);
        return memory_breakdown(state_->get());
    }

    // -- LoRA: llama.cpp applies adapters per context; the KV cache was computed with the
    // previous weights, so it is emptied whenever the applied set or a scale changes.

    void set_lora(const LoraAdapter &lora, float scale) {
        ContextLock lock(*state_);
        check_lora(lora, state_->model, scale);
        auto loras = state_->loras;
        auto it = std::find_if(loras.begin(), loras.end(), [&](const auto &e) { return e.first == lora.data(); });
        if (it == loras.end()) {
            loras.emplace_back(lora.data(), scale);
        } else {
            it->second = scale;
        }
        apply_loras(std::move(loras));
    }

    bool remove_lora(const LoraAdapter &lora) {
        ContextLock lock(*state_);
        auto loras = state_->loras;
        auto it = std::find_if(loras.begin(), loras.end(), [&](const auto &e) { return e.first == lora.data(); });
        if (it == loras.end()) {
            return false;
        }
        loras.erase(it);
        apply_loras(std::move(loras));
        return true;
    }

    void clear_loras() {
        ContextLock lock(*state_);
        apply_loras({});
    }

    std::vector<std::pair<LoraAdapter, float>> loras() {
        ContextLock lock(*state_, Access::read);
        std::vector<std::pair<LoraAdapter, float>> out;
        for (const auto &[data, scale] : state_->loras) {
            out.emplace_back(LoraAdapter(data), scale);
        }
        return out;
    }

    int32_t n_batch() {
        ContextLock lock(*state_, Access::read);
        return static_cast<int32_t>(llama_n_batch(state_->get()));
    }
    // What llama.cpp made of the requested sizes and threads (it clamps n_ubatch to n_batch,
    // n_seq_max to its limits), read back rather than recomputed.
    int32_t n_ubatch() {
        ContextLock lock(*state_, Access::read);
        return static_cast<int32_t>(llama_n_ubatch(state_->get()));
    }
    int32_t n_seq_max() {
        ContextLock lock(*state_, Access::read);
        return static_cast<int32_t>(llama_n_seq_max(state_->get()));
    }
    int32_t n_threads() {
        ContextLock lock(*state_, Access::read);
        return llama_n_threads(state_->get());
    }
    int32_t n_threads_batch() {
        ContextLock lock(*state_, Access::read);
        return llama_n_threads_batch(state_->get());
    }
    int32_t n_past() {
        ContextLock lock(*state_, Access::read);
        return state_->n_past();
    }
    std::vector<llama_token> tokens() {
        ContextLock lock(*state_, Access::read);
        return state_->tokens;
    }
    void reset() {
        ContextLock lock(*state_);
        state_->clear();
    }
    void eval(const std::vector<llama_token> &toks) {
        ContextLock lock(*state_);
        state_->check_tokens(toks);
        if (state_->tokens.size() + toks.size() > static_cast<size_t>(state_->n_ctx())) {
            throw ContextOverflowError("evaluating " + std::to_string(toks.size()) + " tokens after " +
                                       std::to_string(state_->tokens.size()) +
                                       " would exceed the context window of " +
                                       std::to_string(state_->n_ctx()));
        }
        state_->decode(toks.data(), toks.size());
    }
    std::vector<float> logits() {
        ContextLock lock(*state_);
        if (!state_->logits_ready) {
            throw LlamaError("no logits: evaluate a token first (a reset or a loaded state has none)");
        }
        const float *row = llama_get_logits_ith(state_->get(), -1);
        if (row == nullptr) throw LlamaError("no logits available for the last token");
        return std::vector<float>(row, row + llama_vocab_n_tokens(state_->vocab));
    }
    // -- KV cache operations on sequence 0 (the tokens mirror follows them) ---------------

    void kv_truncate(int32_t n) {
        ContextLock lock(*state_);
        if (n < 0 || static_cast<size_t>(n) > state_->tokens.size()) {
            throw InvalidArgumentError("cannot keep " + std::to_string(n) + " of " +
                                       std::to_string(state_->tokens.size()) + " cached tokens");
        }
        if (static_cast<size_t>(n) == state_->tokens.size()) return;
        if (n == 0 || !llama_memory_seq_rm(llama_get_memory(state_->get()), 0, n, -1)) {
            if (n != 0) {
                state_->clear();
                throw LlamaError("this model's cache cannot drop a suffix; it was emptied");
            }
            state_->clear();
            return;
        }
        state_->tokens.resize(static_cast<size_t>(n));
        state_->logits_ready = false;
    }

    // Drops cached tokens [p0, p1) and moves the later ones back: the context shift that makes
    // room in a full window without evaluating the remaining tokens again.
    void kv_shift(int32_t p0, int32_t p1) {
        ContextLock lock(*state_);
        const auto n = static_cast<int32_t>(state_->tokens.size());
        if (p0 < 0 || p1 < p0 || p1 > n) {
            throw InvalidArgumentError("invalid range [" + std::to_string(p0) + ", " + std::to_string(p1) +
                                       ") of " + std::to_string(n) + " cached tokens");
        }
        if (p0 == p1) return;
        llama_memory_t mem = llama_get_memory(state_->get());
        if (!llama_memory_can_shift(mem)) {
            throw LlamaError("this model's cache does not support shifting positions");
        }
        if (!llama_memory_seq_rm(mem, 0, p0, p1)) {
            state_->clear();
            throw LlamaError("this model's cache cannot drop a middle range; it was emptied");
        }
        llama_memory_seq_add(mem, 0, p1, -1, p0 - p1);
        state_->tokens.erase(state_->tokens.begin() + p0, state_->tokens.begin() + p1);
        state_->logits_ready = false;
    }

    // -- embeddings ---------------------------------------------------------------------

    // Embeddings of each input: one vector per input (pooled), or one per token when the
    // pooling type is NONE. With rank pooling (a reranker) an input's "vector" is its
    // n_cls_out classifier outputs, the size llama.cpp gives a sequence's output then.
    // Inputs are packed into batches of up to n_batch tokens and n_seq_max sequences, one
    // sequence each; a sequence never spans two batches, so the result of an input does not
    // depend on what it was batched with.
    Embeddings embed(std::vector<std::vector<llama_token>> inputs, bool normalize, bool truncate,
                     const Cancellation *cancellation) {
        ContextLock lock(*state_);
        // The abort callback watches the flag while a batch decodes; it is checked between them.
        struct Watch {
            ContextState &state;
            ~Watch() { state.cancel.reset(); }
        } watch{*state_};
        if (cancellation != nullptr) state_->cancel = cancellation->flag();
        llama_context *c = state_->get();
        if (!embeddings_) {
            throw LlamaError("embeddings are off: create the model with embedding=True");
        }
        const auto n_batch = static_cast<size_t>(state_->batch->capacity);
        for (auto &input : inputs) {
            state_->check_tokens(input);
            if (input.empty()) {
                throw InvalidArgumentError("cannot embed an empty input (no tokens)");
            }
            if (input.size() > n_batch) {
                if (!truncate) {
                    throw ContextOverflowError("an input has " + std::to_string(input.size()) +
                                               " tokens, more than n_batch=" + std::to_string(n_batch) +
                                               " (pass truncate=True, or a larger n_batch)");
                }
                input.resize(n_batch);
            }
        }
        const enum llama_pooling_type pooling = llama_pooling_type(c);
        Embeddings out;
        out.per_token = pooling == LLAMA_POOLING_TYPE_NONE;
        out.width = pooling == LLAMA_POOLING_TYPE_RANK ? llama_model_n_cls_out(state_->model.get())
                                                       : static_cast<size_t>(llama_model_n_embd_out(state_->model.get()));
        out.buffers.resize(out.per_token ? inputs.size() : 1);
        if (!out.per_token) out.buffers[0].reserve(inputs.size() * out.width);
        const auto n_seq_max = static_cast<size_t>(llama_n_seq_max(c));
        size_t next = 0;
        while (next < inputs.size()) {
            size_t first = next, n_tokens = 0;
            while (next < inputs.size() && next - first < n_seq_max && n_tokens + inputs[next].size() <= n_batch) {
                n_tokens += inputs[next].size();
                ++next;
            }
            if (cancellation != nullptr && cancellation->cancelled()) {
                throw CancelledError("the embedding was cancelled");
            }
            embed_batch(inputs, first, next, out);
        }
        if (normalize && out.width > 0) {
            for (auto &buffer : out.buffers) {
                for (size_t row = 0; row < buffer.size(); row += out.width) {
                    float *v = buffer.data() + row;
                    double norm = 0.0;
                    for (size_t i = 0; i < out.width; ++i) norm += static_cast<double>(v[i]) * v[i];
                    norm = std::sqrt(norm);
                    if (norm > 0.0) {
                        for (size_t i = 0; i < out.width; ++i) v[i] = static_cast<float>(v[i] / norm);
                    }
                }
            }
        }
        return out;
    }

    // The token lists that rerank_prompt makes of `query` paired with each document.
    std::vector<std::vector<llama_token>> rerank_inputs(const std::string &query,
                                                        const std::vector<std::string> &documents) {
        ContextLock lock(*state_);
        std::vector<std::vector<llama_token>> out;
        out.reserve(documents.size());
        for (const auto &document : documents) {
            out.push_back(rerank_prompt(state_->model.get(), state_->vocab, query, document));
        }
        return out;
    }

    int32_t pooling_type() {
        ContextLock lock(*state_);
        return static_cast<int32_t>(llama_pooling_type(state_->get()));
    }

    // -- state: the KV cache (and last logits) with the tokens it holds -------------------

    std::string state_data(std::vector<llama_token> &tokens_out) {
        ContextLock lock(*state_);
        llama_context *c = state_->get();
        std::string data(llama_state_get_size(c), '\0');
        const size_t written = llama_state_get_data(c, reinterpret_cast<uint8_t *>(data.data()), data.size());
        if (written == 0) {
            throw LlamaError("llama_state_get_data failed");
        }
        data.resize(written);
        tokens_out = state_->tokens;
        return data;
    }

    void set_state_data(const char *data, size_t size, const std::vector<llama_token> &toks) {
        ContextLock lock(*state_);
        state_->check_tokens(toks);
        if (toks.size() > static_cast<size_t>(state_->n_ctx())) {
            throw ContextOverflowError("the state holds " + std::to_string(toks.size()) +
                                       " tokens, more than the context window of " +
                                       std::to_string(state_->n_ctx()));
        }
        // The state opens with the architecture's name, as a uint32 length and the bytes.
        // llama.cpp allocates (and zeroes) that length before it checks it against the data
        // left: a damaged length cost up to 4 GiB and seconds before the error.
        uint32_t arch_size = 0;
        if (size >= sizeof(arch_size)) std::memcpy(&arch_size, data, sizeof(arch_size));
        if (size < sizeof(arch_size) || arch_size > size - sizeof(arch_size)) {
            state_->logits_ready = false;
            state_->clear();  // as a state llama.cpp refuses leaves it: an empty KV cache
            throw LlamaError("the state could not be loaded: it is truncated or damaged (its header runs past its "
                             "end)");
        }
        tl_last_errors.clear();
        const size_t read = llama_state_set_data(state_->get(), reinterpret_cast<const uint8_t *>(data), size);
        adopt_loaded_state(read != 0, toks, "the state could not be loaded");
    }

    void save_state_file(const std::string &path) {
        ContextLock lock(*state_);
        tl_last_errors.clear();
        if (!llama_state_save_file(state_->get(), path.c_str(), state_->tokens.data(), state_->tokens.size())) {
            throw LlamaError("could not save the state to '" + path + "': " + tl_last_errors);
        }
    }

    void load_state_file(const std::string &path) {
        ContextLock lock(*state_);
        std::vector<llama_token> toks(static_cast<size_t>(state_->n_ctx()));
        size_t count = 0;
        tl_last_errors.clear();
        const bool ok = llama_state_load_file(state_->get(), path.c_str(), toks.data(), toks.size(), &count);
        toks.resize(ok ? count : 0);
        adopt_loaded_state(ok, toks, "could not load the state from '" + path + "'");
    }

    PerfData perf() {
        ContextLock lock(*state_, Access::read);
        // llama.cpp adds a decode to the timings only when it synchronizes: without this, the
        // last eval() (nothing read back from it yet) would be missing. A read beside a
        // paused stream of this thread may do it too: nothing is computing then.
        llama_synchronize(state_->get());
        llama_perf_context_data d = llama_perf_context(state_->get());
        // llama.cpp reports at least 1 token of each kind (it divides by them); no time means none.
        const int32_t n_prompt = d.t_p_eval_ms > 0.0 ? d.n_p_eval : 0;
        const int32_t n_eval = d.t_eval_ms > 0.0 ? d.n_eval : 0;
        return PerfData{d.t_load_ms, d.t_p_eval_ms, d.t_eval_ms, n_prompt, n_eval, d.n_reused};
    }
    void perf_reset() {
        ContextLock lock(*state_);
        llama_synchronize(state_->get());  // or a pending decode would count after the reset
        llama_perf_context_reset(state_->get());
    }

  private:
    bool embeddings_ = false;

    // Decodes inputs [first, last) as sequences 0.. of one batch and appends their outputs.
    void embed_batch(const std::vector<std::vector<llama_token>> &inputs, size_t first, size_t last,
                     Embeddings &out) {
        llama_context *c = state_->get();
        llama_batch &b = state_->batch->batch;
        b.n_tokens = 0;
        for (size_t k = first; k < last; ++k) {
            const auto &input = inputs[k];
            for (size_t i = 0; i < input.size(); ++i) {
                const int32_t j = b.n_tokens++;
                b.token[j] = input[i];
                b.pos[j] = static_cast<llama_pos>(i);
                b.n_seq_id[j] = 1;
                b.seq_id[j][0] = static_cast<llama_seq_id>(k - first);
                b.logits[j] = 1;
            }
        }
        state_->clear();  // each sequence starts from an empty cache
        const int32_t rc = llama_decode(c, b);
        state_->clear();
        if (rc == 2) {
            state_->throw_aborted("the embedding");
        }
        if (rc != 0) {
            throw DecodeError("llama_decode failed with code " + std::to_string(rc) + " while embedding");
        }
        int32_t row = 0;
        for (size_t k = first; k < last; ++k) {
            const float *v = nullptr;
            if (!out.per_token) {
                // Sized by llama.cpp: n_embd floats, or n_cls_out with rank pooling.
                v = llama_get_embeddings_seq(c, static_cast<llama_seq_id>(k - first));
                if (v == nullptr) throw LlamaError("no pooled embedding for an input");
                out.buffers[0].insert(out.buffers[0].end(), v, v + out.width);
                row += static_cast<int32_t>(inputs[k].size());
                continue;
            }
            auto &buffer = out.buffers[k];
            buffer.reserve(inputs[k].size() * out.width);
            for (size_t i = 0; i < inputs[k].size(); ++i, ++row) {
                v = llama_get_embeddings_ith(c, row);
                if (v == nullptr) throw LlamaError("no embedding for a token");
                buffer.insert(buffer.end(), v, v + out.width);
            }
        }
    }

    void apply_loras(LoraSet loras) {
        set_context_loras(state_->get(), loras);
        state_->loras = std::move(loras);
        state_->clear();
    }

    // After llama.cpp restored a state: adopt its tokens, or leave an empty cache and raise.
    void adopt_loaded_state(bool ok, const std::vector<llama_token> &toks, const std::string &what) {
        // llama.cpp's state holds the KV cache only: the logits of the last token are gone.
        state_->logits_ready = false;
        if (ok && state_->n_past() == static_cast<int32_t>(toks.size())) {
            state_->tokens = toks;
            return;
        }
        state_->clear();
        throw LlamaError(what + ": " + last_errors_or("it does not match the tokens it was saved with"));
    }

    std::shared_ptr<ContextState> state_;
};

void bind_context(nb::module_ &m) {
    py_context_busy_error = new_exception(
        m, "ContextBusyError", py_llama_error,
        "The context is held by a stream open in the calling thread or by the generation whose hook made the "
        "call; or a stream left unread past stream_timeout lost the context to a waiting call.");
    nb::register_exception_translator([](const std::exception_ptr &p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const ContextBusyError &e) {
            PyErr_SetString(py_context_busy_error, e.what());
        }
    });
    nb::class_<ContextOptions>(m, "ContextOptions", "Options for a context (llama_context_params).")
        .def(nb::init<>())
        .def_rw("n_ctx", &ContextOptions::n_ctx)
        .def_rw("n_batch", &ContextOptions::n_batch)
        .def_rw("n_ubatch", &ContextOptions::n_ubatch)
        .def_rw("n_threads", &ContextOptions::n_threads)
        .def_rw("n_threads_batch", &ContextOptions::n_threads_batch)
        .def_rw("flash_attn", &ContextOptions::flash_attn)
        .def_rw("offload_kqv", &ContextOptions::offload_kqv)
        .def_rw("embeddings", &ContextOptions::embeddings)
        .def_rw("rope_freq_base", &ContextOptions::rope_freq_base)
        .def_rw("rope_freq_scale", &ContextOptions::rope_freq_scale)
        .def_rw("rope_scaling_type", &ContextOptions::rope_scaling_type)
        .def_rw("yarn_ext_factor", &ContextOptions::yarn_ext_factor)
        .def_rw("yarn_attn_factor", &ContextOptions::yarn_attn_factor)
        .def_rw("yarn_beta_fast", &ContextOptions::yarn_beta_fast)
        .def_rw("yarn_beta_slow", &ContextOptions::yarn_beta_slow)
        .def_rw("yarn_orig_ctx", &ContextOptions::yarn_orig_ctx)
        .def_rw("pooling_type", &ContextOptions::pooling_type)
        .def_rw("type_k", &ContextOptions::type_k)
        .def_rw("type_v", &ContextOptions::type_v)
        .def_rw("n_seq_max", &ContextOptions::n_seq_max)
        .def_rw("kv_unified", &ContextOptions::kv_unified)
        .def_rw("verbose", &ContextOptions::verbose)
        .def_rw("profile_experts", &ContextOptions::profile_experts,
                "Count the experts a MoE model routes each token to (no effect on a dense model).")
        .def_rw("profile_experts_trace", &ContextOptions::profile_experts_trace,
                "Tokens whose routing the profiler keeps (the latest ones; 0: none); the trace takes at most "
                "EXPERT_TRACE_MAX_BYTES (1 GiB): more raises InvalidArgumentError when the context is created.")
        .def_rw("stream_timeout", &ContextOptions::stream_timeout,
                "Seconds a paused TokenStream may keep other calls waiting before it loses the context.");

    nb::class_<PerfData>(m, "PerfData", "llama.cpp's context timings since the last reset.")
        .def_ro("t_load_ms", &PerfData::t_load_ms)
        .def_ro("t_prompt_ms", &PerfData::t_prompt_ms)
        .def_ro("t_eval_ms", &PerfData::t_eval_ms)
        .def_ro("n_prompt", &PerfData::n_prompt)
        .def_ro("n_eval", &PerfData::n_eval)
        .def_ro("n_reused", &PerfData::n_reused);

    nb::class_<Context>(m, "Context", "A llama_context: KV cache, batch buffer and token loop.")
        .def(nb::init<const Model &, const ContextOptions &>(), "model"_a, "options"_a,
             nb::call_guard<nb::gil_scoped_release>())
        .def("close", &Context::close, nb::call_guard<nb::gil_scoped_release>(),
             "Stop any running call at its next step, wait for it, free the context. Idempotent.")
        .def_prop_ro("closed", &Context::closed)
        .def("n_ctx", &Context::n_ctx, nb::call_guard<nb::gil_scoped_release>())
        .def("memory_breakdown", &Context::memory_use, nb::call_guard<nb::gil_scoped_release>(),
             "llama.cpp's accounting by device: {name: {'model', 'context', 'compute': bytes}}.")
        .def("n_batch", &Context::n_batch, nb::call_guard<nb::gil_scoped_release>())
        .def("n_ubatch", &Context::n_ubatch, nb::call_guard<nb::gil_scoped_release>())
        .def("n_seq_max", &Context::n_seq_max, nb::call_guard<nb::gil_scoped_release>())
        .def("n_threads", &Context::n_threads, nb::call_guard<nb::gil_scoped_release>())
        .def("n_threads_batch", &Context::n_threads_batch, nb::call_guard<nb::gil_scoped_release>())
        .def("n_past", &Context::n_past, nb::call_guard<nb::gil_scoped_release>(),
             "Tokens in sequence 0 of the KV cache, as llama.cpp reports it.")
        .def("tokens", &Context::tokens, nb::call_guard<nb::gil_scoped_release>(),
             "The tokens held in the KV cache.")
        .def("reset", &Context::reset, nb::call_guard<nb::gil_scoped_release>())
        .def("eval", &Context::eval, "tokens"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Append ``tokens`` to the KV cache (n_batch at a time).")
        .def(
            "logits",
            [](Context &self) {
                std::vector<float> row;
                {
                    nb::gil_scoped_release release;
                    row = self.logits();
                }
                const size_t n_vocab = row.size();
                return owned_array<float, 1>(std::move(row), {n_vocab});
            },
            "The logits of the last evaluated token: a float32 array of n_vocab (a copy).")
        .def(
            "state_data",
            [](Context &self) {
                std::vector<llama_token> toks;
                std::string data;
                {
                    nb::gil_scoped_release release;
                    data = self.state_data(toks);
                }
                return std::make_pair(nb::bytes(data.data(), data.size()), toks);
            },
            "The KV cache and last logits as bytes, and the tokens they hold.")
        .def(
            "set_state_data",
            [](Context &self, nb::bytes data, std::vector<llama_token> toks) {
                // The caller's reference keeps the (immutable) bytes alive, so no copy; their
                // address and size are read before the release (both are Python API calls).
                const char *bytes = data.c_str();
                const size_t size = data.size();
                nb::gil_scoped_release release;
                self.set_state_data(bytes, size, toks);
            },
            "data"_a, "tokens"_a, "Restore what state_data returned (raises LlamaError if it does not fit).")
        .def("save_state_file", &Context::save_state_file, "path"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("load_state_file", &Context::load_state_file, "path"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("kv_truncate", &Context::kv_truncate, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Keep the first ``n`` cached tokens.")
        .def("kv_shift", &Context::kv_shift, "p0"_a, "p1"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Drop cached tokens [p0, p1) and move the later ones back.")
        .def(
            "embed",
            [](Context &self, std::vector<std::vector<llama_token>> inputs, bool normalize, bool truncate,
               const Cancellation *cancellation) -> std::variant<FloatArray<2>, std::vector<FloatArray<2>>> {
                const size_t n_inputs = inputs.size();
                Embeddings out;
                {
                    nb::gil_scoped_release release;
                    out = self.embed(std::move(inputs), normalize, truncate, cancellation);
                }
                if (!out.per_token) {
                    return owned_array<float, 2>(std::move(out.buffers[0]), {n_inputs, out.width});
                }
                std::vector<FloatArray<2>> arrays;
                arrays.reserve(out.buffers.size());
                for (auto &buffer : out.buffers) {
                    const size_t n_tokens = out.width == 0 ? 0 : buffer.size() / out.width;
                    arrays.push_back(owned_array<float, 2>(std::move(buffer), {n_tokens, out.width}));
                }
                return arrays;
            },
            "inputs"_a, "normalize"_a, "truncate"_a, "cancellation"_a.none() = nullptr,
            "Embeddings of each token list as float32 arrays: one (n_inputs, width) array when pooled "
            "(width n_embd, or n_cls_out with rank pooling), a (n_tokens, n_embd) array per input otherwise.")
        .def("pooling_type", &Context::pooling_type, nb::call_guard<nb::gil_scoped_release>(),
             "llama.cpp's pooling type of this context (0 none, 1 mean, 2 CLS, 3 last, 4 rank).")
        .def(
            "rerank_inputs",
            [](Context &self, nb::bytes query, std::vector<nb::bytes> documents) {
                std::string q(query.c_str(), query.size());
                std::vector<std::string> docs;
                docs.reserve(documents.size());
                for (const auto &d : documents) docs.emplace_back(d.c_str(), d.size());
                nb::gil_scoped_release release;
                return self.rerank_inputs(q, docs);
            },
            "query"_a, "documents"_a,
            "The tokens llama-server scores for ``query`` (UTF-8) paired with each document: the model's "
            "rerank template, or BOS query EOS SEP document EOS.")
        .def("set_lora", &Context::set_lora, "adapter"_a, "scale"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Apply ``adapter`` at ``scale`` (or change its scale); empties the KV cache.")
        .def("remove_lora", &Context::remove_lora, "adapter"_a, nb::call_guard<nb::gil_scoped_release>(),
             "Stop applying ``adapter``; False if it was not applied. Empties the KV cache.")
        .def("clear_loras", &Context::clear_loras, nb::call_guard<nb::gil_scoped_release>())
        .def("loras", &Context::loras, nb::call_guard<nb::gil_scoped_release>(),
             "The applied adapters and their scales, as llama.cpp was given them.")
        .def("perf", &Context::perf, nb::call_guard<nb::gil_scoped_release>())
        .def("perf_reset", &Context::perf_reset, nb::call_guard<nb::gil_scoped_release>())
        .def("expert_profiler", &Context::expert_profiler,
             "The expert-routing profiler (None unless created with profile_experts on a MoE model).");
}

// =====================================================================================
// Generation: the token loop
// =====================================================================================

struct GenerationResult {
    std::string text;
    std::vector<llama_token> tokens;
    std::string finish_reason;
    std::optional<std::string> stop_sequence;  // the stop string that ended it, if one did
    int32_t n_prompt = 0;
    int32_t n_reused = 0;
    std::vector<TokenLogprob> logprobs;         // one per generated token, if asked for
    std::vector<TokenLogprob> prompt_logprobs;  // one per prompt token after the first
};

// One generation on a context's sequence 0: the prompt (reusing the cached prefix), then
// sample -> accept -> decode one token at a time, entirely in C++, by a SequenceDecoder.
// Used whole by Context.generate and step by step by TokenStream; both run it as the
// context's owner with the GIL released.
class Generation {
  public:
    Generation(std::shared_ptr<ContextState> state, std::vector<llama_token> prompt,
               const SamplerConfig &sampling, GenerateOptions options)
        : state_(std::move(state)), prompt_(std::move(prompt)), decoder_(sampling, std::move(options)) {}

    bool finished() const { return decoder_.finished(); }
    const std::string &finish_reason() const { return decoder_.finish_reason(); }
    const std::optional<std::string> &stop_sequence() const { return decoder_.stop_sequence(); }
    int32_t n_prompt() const { return static_cast<int32_t>(prompt_.size()); }
    int32_t n_reused() const { return static_cast<int32_t>(n_reused_); }
    const std::vector<llama_token> &generated() const { return decoder_.generated(); }
    const std::vector<TokenLogprob> &prompt_logprobs() const { return prompt_logprobs_; }
    const Cancellation &cancellation() const { return decoder_.options().cancellation; }

    // Runs until some text is ready or the generation ends. The caller owns the context.
    Chunk next() {
        Chunk chunk;
        if (finished()) return chunk;
        ActiveCancellation active(*state_, cancellation());
        if (!started_) start();
        while (!finished() && chunk.text.empty()) {
            step(chunk);
        }
        return chunk;
    }

  private:
    // Points the context's abort callback at this generation's flag while it runs.
    struct ActiveCancellation {
        ContextState &state;
        ActiveCancellation(ContextState &s, const Cancellation &c) : state(s) { state.cancel = c.flag(); }
        ~ActiveCancellation() { state.cancel.reset(); }
    };

    void start() {
        started_ = true;
        decoder_.start(state_->model.get(), prompt_, state_->n_ctx());
        const GenerateOptions &options = decoder_.options();
        n_reused_ = options.prompt_logprobs
                        ? state_->load_prompt(prompt_, &prompt_logprobs_, std::max(options.n_probs, 0))
                        : state_->load_prompt(prompt_);
    }

    void step(Chunk &chunk) {
        if (state_->closing.load()) {
            throw ClosedError("the context was closed during generation");
        }
        if (cancellation().cancelled()) {
            throw CancelledError("the generation was cancelled");
        }
        const Sample sample = decoder_.sample(state_->get(), -1);
        if (decoder_.accept(sample, state_->tokens.size(), chunk)) {
            state_->decode(&sample.token, 1);
        }
    }

    std::shared_ptr<ContextState> state_;
    std::vector<llama_token> prompt_;
    SequenceDecoder decoder_;
    std::vector<TokenLogprob> prompt_logprobs_;
    size_t n_reused_ = 0;
    bool started_ = false;
};

GenerationResult generate(Context &self, const std::vector<llama_token> &prompt,
                          const SamplerConfig &sampling, const GenerateOptions &options) {
    ContextLock lock(*self.state());
    Generation gen(self.state(), prompt, sampling, options);
    Chunk all;
    while (!gen.finished()) {
        all.append(gen.next());
    }
    GenerationResult result;
    result.text = std::move(all.text);
    result.logprobs = std::move(all.logprobs);
    result.tokens = gen.generated();
    result.finish_reason = gen.finish_reason();
    result.stop_sequence = gen.stop_sequence();
    result.n_prompt = gen.n_prompt();
    result.n_reused = gen.n_reused();
    result.prompt_logprobs = gen.prompt_logprobs();
    return result;
}

// A generation driven from Python, one chunk per next(). The stream owns the context from
// its first step until it ends, is closed or is garbage collected: other threads' calls
// wait for it (a call from the thread that holds it raises ContextBusyError instead of
// deadlocking). A stream left unread longer than the context's stream_timeout while another
// call waits loses the context: its next step raises ContextBusyError.
//
// Steps may run on any thread (async iteration hands them to workers); what Python reads
// between steps (tokens, finish_reason, ...) is a copy guarded by `record_mutex_`.
class TokenStream {
  public:
    TokenStream(std::shared_ptr<ContextState> state, std::vector<llama_token> prompt,
                const SamplerConfig &sampling, GenerateOptions options)
        : state_(state), gen_(std::move(state), std::move(prompt), sampling, std::move(options)),
          n_prompt_(gen_.n_prompt()), cancellation_(gen_.cancellation()) {}
    TokenStream(const TokenStream &) = delete;
    TokenStream &operator=(const TokenStream &) = delete;
    ~TokenStream() { close(); }

    // Thread-safe: the generation stops at its next token and raises GenerationCancelled.
    void cancel() const { cancellation_.cancel(); }

    // Called with the GIL released.
    std::optional<Chunk> next() {
        {
            std::unique_lock<std::mutex> lock(state_->mutex);
            if (done_) return std::nullopt;
            if (!held_) {
                state_->acquire(lock, this, true);
                held_ = true;
            } else if (state_->owner != this) {
                done_ = true;  // revoked: the context was closed or given to a waiting call
                if (state_->closing.load()) throw ClosedError("the context was closed during generation");
                throw ContextBusyError("this stream was left unread for longer than the context's stream_timeout "
                                       "while another call waited for the context; it was interrupted");
            } else {
                state_->resume();
            }
        }
        std::optional<Chunk> chunk;
        try {
            chunk = gen_.next();
        } catch (...) {
            end_step(true);
            throw;
        }
        {
            std::lock_guard<std::mutex> lock(record_mutex_);
            tokens_.insert(tokens_.end(), chunk->tokens.begin(), chunk->tokens.end());
            n_reused_ = gen_.n_reused();
            if (prompt_logprobs_.empty()) prompt_logprobs_ = gen_.prompt_logprobs();
            if (gen_.finished()) {
                finish_reason_ = gen_.finish_reason();
                stop_sequence_ = gen_.stop_sequence();
            }
        }
        end_step(gen_.finished());
        return chunk;
    }

    // Ends the stream early and gives the context back; later next() calls return None. A
    // step running in another thread gives it back when it returns. Safe with the GIL held.
    void close() {
        std::unique_lock<std::mutex> lock(state_->mutex);
        done_ = true;
        if (!held_ || state_->owner != this || state_->owner_running) return;
        held_ = false;
        state_->release(lock, this);
    }

    std::optional<std::string> finish_reason() const {
        std::lock_guard<std::mutex> lock(record_mutex_);
        return finish_reason_;
    }
    std::optional<std::string> stop_sequence() const {
        std::lock_guard<std::mutex> lock(record_mutex_);
        return stop_sequence_;
    }
    std::vector<llama_token> tokens() const {
        std::lock_guard<std::mutex> lock(record_mutex_);
        return tokens_;
    }
    int32_t n_reused() const {
        std::lock_guard<std::mutex> lock(record_mutex_);
        return n_reused_;
    }
    std::vector<TokenLogprob> prompt_logprobs() const {
        std::lock_guard<std::mutex> lock(record_mutex_);
        return prompt_logprobs_;
    }
    int32_t n_prompt() const { return n_prompt_; }
    const Cancellation &cancellation() const { return cancellation_; }

  private:
    // After a step: the stream stays the owner (idle) or, once it has ended, lets go.
    void end_step(bool ended) {
        std::unique_lock<std::mutex> lock(state_->mutex);
        if (ended) done_ = true;
        if (state_->owner != this) return;
        if (done_) {
            held_ = false;
            state_->release(lock, this);
        } else {
            state_->pause();
        }
    }

    std::shared_ptr<ContextState> state_;
    Generation gen_;
    const int32_t n_prompt_;
    const Cancellation cancellation_;
    bool done_ = false;  // guarded by state_->mutex, as is held_
    bool held_ = false;  // this stream took the context (it may since have been revoked)

    mutable std::mutex record_mutex_;
    std::vector<llama_token> tokens_;
    int32_t n_reused_ = 0;
    std::vector<TokenLogprob> prompt_logprobs_;
    std::optional<std::string> finish_reason_;
    std::optional<std::string> stop_sequence_;
};


void bind_generation(nb::module_ &m) {
    nb::class_<GenerationResult>(m, "GenerationResult", "The outcome of Context.generate.")
        .def_ro("text", &GenerationResult::text)
        .def_ro("tokens", &GenerationResult::tokens)
        .def_ro("finish_reason", &GenerationResult::finish_reason, "'stop' or 'length'.")
        .def_ro("stop_sequence", &GenerationResult::stop_sequence, "The stop string that ended it, if one did.")
        .def_ro("n_prompt", &GenerationResult::n_prompt)
        .def_ro("n_reused", &GenerationResult::n_reused, "Prompt tokens served from the cache.")
        .def_ro("logprobs", &GenerationResult::logprobs)
        .def_ro("prompt_logprobs", &GenerationResult::prompt_logprobs);

    nb::class_<TokenStream>(m, "TokenStream", "A generation advanced one chunk at a time.")
        .def("next", &TokenStream::next, nb::call_guard<nb::gil_scoped_release>(),
             "The next chunk, or None once the generation has ended.")
        .def("cancel", &TokenStream::cancel, "Stop at the next token (next() then raises GenerationCancelled).")
        .def("close", &TokenStream::close, "Stop early and give the context back; later next() calls return None.")
        .def_prop_ro("finish_reason", &TokenStream::finish_reason)
        .def_prop_ro("stop_sequence", &TokenStream::stop_sequence, "The stop string that ended it, if one did.")
        .def_prop_ro(
            "queue_seconds", [](const TokenStream &) { return std::optional<double>(); },
            "None: a context has no queue (a pool's stream says how long it waited for a slot).")
        .def_prop_ro("tokens", &TokenStream::tokens, "The tokens generated so far.")
        .def_prop_ro("n_prompt", &TokenStream::n_prompt)
        .def_prop_ro("n_reused", &TokenStream::n_reused, "Prompt tokens served from the cache.")
        .def_prop_ro("prompt_logprobs", &TokenStream::prompt_logprobs)
        .def_prop_ro("cancellation", &TokenStream::cancellation);

    // Context's generation methods, added to the class bind_context made.
    nb::handle context = nb::type<Context>();
    context.attr("generate") = nb::cpp_function(&generate, nb::scope(context), nb::name("generate"), nb::is_method(),
                                                "prompt"_a, "sampling"_a, "options"_a,
                                                nb::call_guard<nb::gil_scoped_release>(),
                                                "Run the whole token loop in C++.");
    context.attr("stream") = nb::cpp_function(
        [](Context &self, std::vector<llama_token> prompt, const SamplerConfig &sampling, const GenerateOptions &options) {
            return new TokenStream(self.state(), std::move(prompt), sampling, options);
        },
        nb::scope(context), nb::name("stream"), nb::is_method(), "prompt"_a, "sampling"_a, "options"_a,
        nb::rv_policy::take_ownership,
        "Like generate, but returns a TokenStream that runs one step per next() and owns the context until it ends.");
}

// =====================================================================================
// Engine: continuous batching
// =====================================================================================
//
// One model, one context holding n_slots sequences, and a scheduler thread that runs, in a
// single llama_decode per step, the next token of every running request together with
// prompt chunks of newly admitted ones (llama-server's design). Requests wait in a bounded
// queue for a free sequence slot; each has its own sampler chain (grammar, seed, penalties),
// stop strings and token limit, and hands its text to the thread reading it.
//
// Threads: the slots, the context and the batch belong to the scheduler thread alone.
// EngineQueue::mutex guards the waiting queue and the busy count; each request's output is
// guarded by its own mutex. Lock order: queue, then request. No lock is held while decoding,
// and no Python object is touched (the Python side reads streams with the GIL released).

struct PoolBusyError : LlamaError {
    using LlamaError::LlamaError;
};
PyObject *py_pool_busy_error = nullptr;

struct EngineOptions {
    int32_t n_slots = 4;     // concurrent sequences
    int32_t max_queue = 64;  // requests that may wait for a slot; beyond them submit raises
    // A new request waits for a running prefill that shares at least this many more prompt
    // tokens than any cached sequence, then copies them instead of evaluating them again.
    // Without a unified cache, also the fewest tokens worth copying another sequence's cells
    // for (a whole stream is copied) instead of evaluating them.
    int32_t min_shared_prefix = 16;
};

struct EngineStats {
    int32_t n_slots = 0;
    int32_t n_busy = 0;           // admitted, not finished
    int32_t n_waiting = 0;        // queued for a slot
    int64_t n_decode_calls = 0;   // llama_decode calls
    int64_t n_prompt_evaluated = 0;  // prompt tokens decoded
    int64_t n_prompt_reused = 0;     // prompt tokens served from a cached or copied prefix
    int64_t n_generated = 0;         // tokens sampled
    int64_t n_cached_tokens = 0;     // tokens the sequences hold now (a shared prefix counts in each)
    // Waits for a slot of the requests admitted so far: (upper bound in seconds, requests
    // that waited at most that long), cumulative as a Prometheus histogram's buckets, +inf last.
    std::vector<std::pair<double, int64_t>> queue_time_buckets;
    double queue_time_sum = 0.0;  // seconds, all admitted requests together
};

// Bucket bounds of EngineStats::queue_time_buckets (seconds), the server's latency buckets.
constexpr std::array<double, 14> kQueueTimeBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1.0,   2.5,  5.0,   10.0, 30.0, 60.0, 120.0};

// One request: what the scheduler needs to run it, and the output its reader waits for.
struct EngineRequest {
    // Set at submission, then owned by the scheduler.
    std::vector<llama_token> prompt;
    const Cancellation cancellation;
    SequenceDecoder decoder;
    LoraSet loras;

    // Output, guarded by `mutex`; `changed` is signalled on every change.
    std::mutex mutex;
    std::condition_variable changed;
    // What each step produced and the reader has not read yet (text, tokens, logprobs), one
    // chunk per sampled token (the last may hold only the text flushed at the end).
    std::deque<Chunk> unread;
    std::vector<TokenLogprob> prompt_logprobs;  // set once the prompt is evaluated, if asked for
    bool done = false;
    std::string finish_reason;
    std::optional<std::string> stop_sequence;
    std::exception_ptr error;
    int32_t n_reused = 0;
    // Submission, and admission to a slot (the scheduler sets it): the wait in the queue.
    const std::chrono::steady_clock::time_point submitted = std::chrono::steady_clock::now();
    std::optional<std::chrono::steady_clock::time_point> admitted;

    EngineRequest(std::vector<llama_token> p, const SamplerConfig &sampling, GenerateOptions options, LoraSet l)
        : prompt(std::move(p)), cancellation(options.cancellation), decoder(sampling, std::move(options)),
          loras(std::move(l)) {}

    // Scoring the prompt needs the logits of every prompt token: no cached prefix is reused.
    bool scores_prompt() const { return decoder.options().prompt_logprobs; }
    int32_t n_probs() const { return std::max(decoder.options().n_probs, 0); }

    void publish(Chunk &chunk) {
        if (chunk.empty()) return;
        std::lock_guard<std::mutex> lock(mutex);
        unread.push_back(std::move(chunk));
        changed.notify_all();
    }

    void finish(const std::string &reason, std::exception_ptr failure = nullptr) {
        std::lock_guard<std::mutex> lock(mutex);
        if (done) return;
        done = true;
        finish_reason = reason;
        if (!failure) stop_sequence = decoder.stop_sequence();
        error = std::move(failure);
        changed.notify_all();
    }
};

// The queue shared by the engine and the streams (a stream's cancel() wakes the scheduler,
// even after the Engine object itself is gone).
struct EngineQueue {
    std::mutex mutex;
    std::condition_variable work;  // the scheduler: new request, cancellation, closing
    std::condition_variable room;  // blocked submitters: a slot or queue place came free
    std::deque<std::shared_ptr<EngineRequest>> waiting;
    int32_t n_busy = 0;  // requests holding a slot
    bool closing = false;

    // Never takes the mutex: called with the GIL held (a stream's destructor), while the
    // scheduler may hold the mutex and wait for the GIL to log a line. A lost wake-up is
    // harmless: the scheduler only sleeps when no request is running or waiting.
    void wake() { work.notify_all(); }
};

// A request as Python sees it: next() blocks (GIL released) for the next text; dropping the
// stream or calling cancel() ends the request and frees its slot. What Python reads between
// calls (tokens, finish_reason, ...) is guarded by the request's mutex, since next() may run
// on another thread.
class EngineStream {
  public:
    EngineStream(std::shared_ptr<EngineRequest> request, std::shared_ptr<EngineQueue> queue)
        : request_(std::move(request)), queue_(std::move(queue)) {}
    EngineStream(const EngineStream &) = delete;
    EngineStream &operator=(const EngineStream &) = delete;
    ~EngineStream() {
        // With the GIL held: only the flag (the queue lock may wait on a thread that needs the
        // GIL). The scheduler drops the request from its slot or the queue.
        if (!finished()) {
            request_->cancellation.cancel();
            queue_->wake();
        }
    }

    // The next token's chunk, waiting for it: one token at a time however far the scheduler
    // ran ahead (a reader that fell behind still streams token by token, as a context's
    // stream does), except that tokens completing no text yet (a character split across
    // tokens) go out with the one that completes it, when it is there. None once the request
    // has ended and all was read. Raises the request's error (cancelled, closed, ...) after
    // its last text.
    std::optional<Chunk> next() {
        std::unique_lock<std::mutex> lock(request_->mutex);
        auto &unread = request_->unread;
        // A chunk without a token is only the text flushed at the end, and the end follows.
        request_->changed.wait(lock, [&] { return request_->done || (!unread.empty() && !unread.front().tokens.empty()); });
        if (!unread.empty()) {
            Chunk out = std::move(unread.front());
            unread.pop_front();
            while (out.text.empty() && !unread.empty()) {
                out.append(std::move(unread.front()));
                unread.pop_front();
            }
            tokens_.insert(tokens_.end(), out.tokens.begin(), out.tokens.end());
            return out;
        }
        if (request_->error) std::rethrow_exception(request_->error);
        return std::nullopt;
    }

    // A queued request leaves the queue at once (its place is free on return); a running one
    // ends at the scheduler's next step. Called with the GIL released.
    void cancel() {
        request_->cancellation.cancel();
        {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            auto &waiting = queue_->waiting;
            auto it = std::find(waiting.begin(), waiting.end(), request_);
            if (it != waiting.end()) {
                waiting.erase(it);
                request_->finish("", std::make_exception_ptr(CancelledError("the generation was cancelled")));
                queue_->room.notify_all();
            }
        }
        queue_->wake();
    }

    // Cancels the request unless it has finished (what leaving a stream early means).
    void close() {
        if (!finished()) cancel();
    }

    bool finished() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        return request_->done;
    }
    std::optional<std::string> finish_reason() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        if (!request_->done || request_->error) return std::nullopt;
        return request_->finish_reason;
    }
    std::optional<std::string> stop_sequence() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        return request_->stop_sequence;
    }
    // Seconds the request waited for a slot; None while it waits (or if it never got one).
    std::optional<double> queue_seconds() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        if (!request_->admitted) return std::nullopt;
        return std::chrono::duration<double>(*request_->admitted - request_->submitted).count();
    }
    int32_t n_reused() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        return request_->n_reused;
    }
    std::vector<TokenLogprob> prompt_logprobs() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        return request_->prompt_logprobs;
    }
    std::vector<llama_token> tokens() const {
        std::lock_guard<std::mutex> lock(request_->mutex);
        return tokens_;
    }
    int32_t n_prompt() const { return static_cast<int32_t>(request_->prompt.size()); }
    const Cancellation &cancellation() const { return request_->cancellation; }

  private:
    std::shared_ptr<EngineRequest> request_;
    std::shared_ptr<EngineQueue> queue_;
    std::vector<llama_token> tokens_;  // read so far; guarded by the request's mutex
};

class Engine {
  public:
    Engine(const Model &model, const ContextOptions &context_options, const EngineOptions &options)
        : model_(model.handle()), vocab_(llama_model_get_vocab(model_.get())), options_(options),
          queue_(std::make_shared<EngineQueue>()) {
        QuietScope quiet(!context_options.verbose);
        if (options.n_slots < 1) throw InvalidArgumentError("pool_size must be >= 1");
        if (static_cast<uint32_t>(options.n_slots) > context_options.n_batch) {
            throw InvalidArgumentError("pool_size (" + std::to_string(options.n_slots) +
                                       ") must not exceed n_batch (" + std::to_string(context_options.n_batch) + ")");
        }
        if (options.max_queue < 0) throw InvalidArgumentError("max_queue must be >= 0");
        if (context_options.embeddings) throw InvalidArgumentError("an engine context cannot compute embeddings");
        ContextOptions copts = context_options;
        copts.n_seq_max = static_cast<uint32_t>(options.n_slots);
        // kv_unified: one cell pool, where sequences share a prefix's cells (seq_cp is free) but
        // every token attends over the cells of all of them. Otherwise (llama-server's default
        // with -np N) a stream of cells per sequence: attention reads only its own, and a prefix
        // lent by another sequence is a copy of that sequence's whole stream.
        unified_ = copts.kv_unified;
        llama_context_params params = context_params(copts);
        params.abort_callback = [](void *data) { return static_cast<Engine *>(data)->aborting_.load(); };
        params.abort_callback_data = this;
        profiler_ = ExpertProfiler::create(model_.get(), model.expert_used_override(), copts.profile_experts,
                                           copts.profile_experts_trace);
        ExpertProfiler::attach(params, profiler_.get());
        tl_last_errors.clear();
        llama_context *ctx = llama_init_from_model(model_.get(), params);
        if (ctx == nullptr) {
            throw LlamaError("failed to create a context: " + last_errors_or("see the llama_cpp log"));
        }
        ctx_.reset(ctx);
        // Each sequence gets an equal share of the cells, so that the running ones always fit
        // (its own stream, without kv_unified, which llama.cpp sizes in multiples of 256).
        const uint32_t share = llama_n_ctx(ctx) / static_cast<uint32_t>(options.n_slots);
        n_ctx_seq_ = static_cast<int32_t>(std::min(llama_n_ctx_seq(ctx), share));
        batch_ = std::make_unique<BatchOwner>(static_cast<int32_t>(llama_n_batch(ctx)));
        slots_.resize(static_cast<size_t>(options.n_slots));
        for (size_t i = 0; i < slots_.size(); ++i) slots_[i].seq = static_cast<llama_seq_id>(i);
        scheduler_ = std::thread([this] { run(); });
    }

    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;

    ~Engine() {
        // Joining with the GIL held could deadlock with a log line the scheduler is handing
        // to Python; the package calls close() first, this is the fallback.
        if (Py_IsInitialized() && !python_is_finalizing() && PyGILState_Check()) {
            nb::gil_scoped_release release;
            close();
        } else {
            close();
        }
    }

    // Queues a generation. With `wait`, blocks while the queue is full; otherwise a full queue
    // raises PoolBusyError. Sampling, prompt and options are checked here, in the caller's
    // thread, so that a bad request raises at once.
    // `loras`: the adapters (of this model) and scales the request runs with.
    std::unique_ptr<EngineStream> submit(std::vector<llama_token> prompt, const SamplerConfig &sampling,
                                         GenerateOptions options, bool wait,
                                         const std::vector<std::pair<LoraAdapter, float>> &loras) {
        ModelHandle model;  // kept for this call, even if close() runs meanwhile
        {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            model = model_;
        }
        if (!model) throw ClosedError("the pool is closed");
        if (prompt.empty()) throw InvalidArgumentError("the prompt is empty (no tokens)");
        check_token_ids(vocab_, prompt);
        if (prompt.size() > static_cast<size_t>(n_ctx_seq_)) {
            throw ContextOverflowError("the prompt has " + std::to_string(prompt.size()) +
                                       " tokens, more than the context window of " + std::to_string(n_ctx_seq_));
        }
        LoraSet set;
        for (const auto &[lora, scale] : loras) {
            check_lora(lora, model, scale);
            set.emplace_back(lora.data(), scale);
        }
        // A canonical order (by adapter), so that requests asking for the same set compare equal.
        std::sort(set.begin(), set.end());
        set.erase(std::unique(set.begin(), set.end(), [](const auto &a, const auto &b) { return a.first == b.first; }),
                  set.end());
        auto request = std::make_shared<EngineRequest>(std::move(prompt), sampling, std::move(options), std::move(set));
        request->decoder.start(model.get(), request->prompt, n_ctx_seq_);
        {
            std::unique_lock<std::mutex> lock(queue_->mutex);
            const auto full = [&] {
                return queue_->n_busy + static_cast<int32_t>(queue_->waiting.size()) >=
                       options_.n_slots + options_.max_queue;
            };
            if (wait) {
                queue_->room.wait(lock, [&] { return queue_->closing || !full(); });
            }
            if (queue_->closing) throw ClosedError("the pool is closed");
            if (full()) {
                throw PoolBusyError("the pool is busy: its " + std::to_string(options_.n_slots) + " slots and " +
                                    std::to_string(options_.max_queue) + " queue places are taken");
            }
            queue_->waiting.push_back(request);
        }
        queue_->work.notify_all();
        return std::make_unique<EngineStream>(std::move(request), queue_);
    }

    // Stops the scheduler (a running decode is aborted), fails every unfinished request with
    // ClosedError, frees the context. Idempotent; call with the GIL released.
    void close() {
        {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            queue_->closing = true;
        }
        closed_.store(true);
        aborting_.store(true);
        queue_->work.notify_all();
        queue_->room.notify_all();
        if (std::this_thread::get_id() == scheduler_.get_id()) {
            return;  // from a hook: the scheduler stops after this step; a later close() frees
        }
        std::lock_guard<std::mutex> lock(close_mutex_);
        if (scheduler_.joinable()) scheduler_.join();
        batch_.reset();
        {
            std::lock_guard<std::mutex> ctx_lock(ctx_mutex_);
            ctx_.reset();
        }
        applied_.clear();
        std::lock_guard<std::mutex> queue_lock(queue_->mutex);  // guards model_ against submit()
        model_.reset();
    }

    bool closed() const { return closed_.load(); }

    // Read from any thread: the scheduler holds ctx_mutex_ while it decodes.
    MemoryBreakdown memory_use() const {
        std::lock_guard<std::mutex> lock(ctx_mutex_);
        if (!ctx_) throw ClosedError("the pool is closed");
        return memory_breakdown(ctx_.get());
    }

    EngineStats stats() const {
        EngineStats s;
        {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            s.n_busy = queue_->n_busy;
            s.n_waiting = static_cast<int32_t>(queue_->waiting.size());
            int64_t below = 0;
            for (size_t i = 0; i < kQueueTimeBounds.size(); ++i) {
                below += queue_time_counts_[i];
                s.queue_time_buckets.emplace_back(kQueueTimeBounds[i], below);
            }
            s.queue_time_buckets.emplace_back(std::numeric_limits<double>::infinity(),
                                              below + queue_time_counts_.back());
            s.queue_time_sum = queue_time_sum_;
        }
        s.n_slots = options_.n_slots;
        s.n_decode_calls = n_decode_calls_.load();
        s.n_prompt_evaluated = n_prompt_evaluated_.load();
        s.n_prompt_reused = n_prompt_reused_.load();
        s.n_generated = n_generated_.load();
        s.n_cached_tokens = n_cached_tokens_.load();
        return s;
    }

    int32_t n_ctx_seq() const { return n_ctx_seq_; }

    // Null unless created with profile_experts on a MoE model. Stays readable after close().
    std::shared_ptr<ExpertProfiler> expert_profiler() const { return profiler_; }

  private:
    enum class Phase { idle, wait_prefix, prefill, decode };

    // A sequence of the context and the request running in it. Scheduler thread only.
    struct Slot {
        llama_seq_id seq = 0;
        Phase phase = Phase::idle;
        std::shared_ptr<EngineRequest> request;
        std::vector<llama_token> cached;  // the tokens sequence `seq` holds, in position order
        LoraSet cached_loras;             // ... computed with these adapters
        int32_t first_row = -1;           // prefill: the batch row of this step's first prompt token
        std::vector<TokenLogprob> prompt_logprobs;  // prefill scoring the prompt: so far
        size_t source = 0;                // wait_prefix: the slot whose prefill it waits for
        uint64_t source_admitted = 0;     // ... while it runs the request admitted then
        size_t goal = 0;                  // wait_prefix: tokens it will copy from there
        llama_token next = 0;             // decode: the sampled token to feed
        int32_t row = -1;                 // this step's logits row, or -1
        size_t n_in_batch = 0;            // tokens this step added to the batch
        uint64_t admitted = 0;            // admission order (prefill priority), LRU for reuse
    };

    static size_t common_prefix(const std::vector<llama_token> &a, const std::vector<llama_token> &b) {
        const size_t n = std::min(a.size(), b.size());
        size_t i = 0;
        while (i < n && a[i] == b[i]) ++i;
        return i;
    }

    llama_memory_t memory() const { return llama_get_memory(ctx_.get()); }

    // Tokens of `prompt` that slot `from` can lend: its cached prefix, if llama.cpp still holds
    // all of it (a sliding-window cache drops old positions: pos_min > 0).
    // None if the request scores its prompt (every token's logits are needed) or runs with
    // other adapters than those the cache was computed with.
    size_t reusable(const Slot &from, const EngineRequest &request) const {
        const auto &prompt = request.prompt;
        if (from.cached.empty() || request.scores_prompt() || from.cached_loras != request.loras ||
            llama_memory_seq_pos_min(memory(), from.seq) > 0) {
            return 0;
        }
        return std::min(common_prefix(from.cached, prompt), prompt.size() - 1);  // one token left to decode
    }

    void run() {
        try {
            for (;;) {
                std::vector<std::shared_ptr<EngineRequest>> admitted;
                {
                    std::unique_lock<std::mutex> lock(queue_->mutex);
                    queue_->work.wait(lock, [&] {
                        return queue_->closing || has_running() ||
                               (!queue_->waiting.empty() && queue_->n_busy < options_.n_slots);
                    });
                    if (queue_->closing) break;
                    admitted = admit();
                }
                for (auto &request : admitted) start(std::move(request));  // KV work: no lock held
                step();
                count_cached();
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            queue_->closing = true;
            fail_all(std::current_exception());
            return;
        }
        std::lock_guard<std::mutex> lock(queue_->mutex);
        fail_all(std::make_exception_ptr(ClosedError("the pool was closed before the request finished")));
    }

    // Publishes the tokens the sequences hold (stats()). Before a request is told it ended, so
    // that its reader sees the count that includes it.
    void count_cached() {
        int64_t cached = 0;
        for (const auto &slot : slots_) cached += static_cast<int64_t>(slot.cached.size());
        n_cached_tokens_.store(cached);
    }

    bool has_running() const {
        return std::any_of(slots_.begin(), slots_.end(), [](const Slot &s) { return s.phase != Phase::idle; });
    }

    // Caller holds the queue lock.
    void fail_all(const std::exception_ptr &error) {
        for (auto &slot : slots_) {
            if (slot.request) slot.request->finish("", error);
            slot.request.reset();
            slot.phase = Phase::idle;
        }
        for (auto &request : queue_->waiting) request->finish("", error);
        queue_->waiting.clear();
        queue_->n_busy = 0;
        queue_->room.notify_all();
    }

    // Takes waiting requests for the free slots (FIFO); the caller starts them once it has
    // let go of the queue lock, which it holds here.
    std::vector<std::shared_ptr<EngineRequest>> admit() {
        auto &waiting = queue_->waiting;
        const auto before = waiting.size();
        waiting.erase(std::remove_if(waiting.begin(), waiting.end(),
                                     [](const std::shared_ptr<EngineRequest> &r) {
                                         if (!r->cancellation.cancelled()) return false;
                                         r->finish("", std::make_exception_ptr(CancelledError("the generation was cancelled")));
                                         return true;
                                     }),
                      waiting.end());
        std::vector<std::shared_ptr<EngineRequest>> admitted;
        const auto now = std::chrono::steady_clock::now();
        while (!waiting.empty() && queue_->n_busy < options_.n_slots) {
            {
                std::lock_guard<std::mutex> lock(waiting.front()->mutex);  // lock order: queue, request
                waiting.front()->admitted = now;
            }
            const double waited = std::chrono::duration<double>(now - waiting.front()->submitted).count();
            const auto bucket = std::lower_bound(kQueueTimeBounds.begin(), kQueueTimeBounds.end(), waited);
            ++queue_time_counts_[static_cast<size_t>(bucket - kQueueTimeBounds.begin())];
            queue_time_sum_ += waited;
            admitted.push_back(std::move(waiting.front()));
            waiting.pop_front();
            ++queue_->n_busy;
        }
        if (waiting.size() != before) queue_->room.notify_all();
        return admitted;
    }

    // Puts `request` in the free slot whose cache shares the longest prefix with its prompt
    // (the least recently used one on a tie), then either reuses a cached prefix at once or
    // waits for a running prefill of the same prefix (a shared system prompt is evaluated once).
    void start(std::shared_ptr<EngineRequest> request) {
        const auto &prompt = request->prompt;
        Slot *slot = nullptr;
        size_t own = 0;
        for (auto &s : slots_) {
            if (s.phase != Phase::idle) continue;
            const size_t n = reusable(s, *request);
            if (slot == nullptr || n > own || (n == own && s.admitted < slot->admitted)) {
                slot = &s;
                own = n;
            }
        }
        slot->request = std::move(request);
        slot->admitted = ++clock_;
        const size_t cached = best_prefix(*slot).second;
        for (size_t i = 0; i < slots_.size(); ++i) {
            const Slot &other = slots_[i];
            if (other.phase != Phase::prefill || slot->request->scores_prompt() ||
                other.request->loras != slot->request->loras) {
                continue;
            }
            const size_t shared = std::min(common_prefix(other.request->prompt, prompt), prompt.size() - 1);
            if (shared >= cached + static_cast<size_t>(options_.min_shared_prefix) && shared > other.cached.size()) {
                slot->phase = Phase::wait_prefix;
                slot->source = i;
                slot->source_admitted = other.admitted;
                slot->goal = shared;
                return;
            }
        }
        attach_prefix(*slot);
    }

    // The slot whose cached tokens give `slot`'s prompt its longest prefix, and that prefix's
    // length; `slot` itself counts. Without kv_unified, lending copies the lender's whole stream
    // of cells: another slot is taken only when it saves min_shared_prefix tokens or more.
    std::pair<ptrdiff_t, size_t> best_prefix(const Slot &slot) const {
        const EngineRequest &request = *slot.request;
        const size_t own = reusable(slot, request);
        const size_t gain = unified_ ? 1 : static_cast<size_t>(std::max(options_.min_shared_prefix, 1));
        std::pair<ptrdiff_t, size_t> best{&slot - slots_.data(), own};
        for (size_t i = 0; i < slots_.size(); ++i) {
            const size_t n = reusable(slots_[i], request);
            if (n > best.second && n >= own + gain) best = {static_cast<ptrdiff_t>(i), n};
        }
        return best;
    }

    // Makes `slot`'s sequence hold the longest available prefix of its prompt: its own cache,
    // trimmed, or another sequence's cells (shared, not duplicated, in the unified cache; a
    // copy of that sequence's stream, trimmed, otherwise: llama.cpp copies streams whole, at
    // the next decode). Then the rest of the prompt is prefilled.
    void attach_prefix(Slot &slot) {
        const auto &prompt = slot.request->prompt;
        auto [from, keep] = best_prefix(slot);
        llama_memory_t mem = memory();
        if (&slots_[static_cast<size_t>(from)] != &slot && keep > 0) {
            const llama_seq_id source = slots_[static_cast<size_t>(from)].seq;
            llama_memory_seq_rm(mem, slot.seq, -1, -1);
            if (unified_) {
                llama_memory_seq_cp(mem, source, slot.seq, 0, static_cast<llama_pos>(keep));
            } else {
                llama_memory_seq_cp(mem, source, slot.seq, -1, -1);
                if (!llama_memory_seq_rm(mem, slot.seq, static_cast<llama_pos>(keep), -1)) {
                    llama_memory_seq_rm(mem, slot.seq, -1, -1);  // a recurrent state: not divisible
                    keep = 0;
                }
            }
        } else {
            keep = reusable(slot, *slot.request);
            if (keep == 0 || !llama_memory_seq_rm(mem, slot.seq, static_cast<llama_pos>(keep), -1)) {
                llama_memory_seq_rm(mem, slot.seq, -1, -1);
                keep = 0;
            }
        }
        slot.cached.assign(prompt.begin(), prompt.begin() + static_cast<ptrdiff_t>(keep));
        slot.cached_loras = slot.request->loras;
        n_prompt_reused_ += static_cast<int64_t>(keep);
        {
            std::lock_guard<std::mutex> lock(slot.request->mutex);
            slot.request->n_reused = static_cast<int32_t>(keep);
        }
        slot.phase = Phase::prefill;
    }

    // Ends the request of `slot`. A finished request leaves its tokens cached for the next
    // prompt that starts the same way; a failed or cancelled one frees its cells.
    // The slot is free before the reader hears of the end, so that stats() agree with it.
    void release(Slot &slot, const std::string &reason, std::exception_ptr error = nullptr) {
        const bool failed = error != nullptr;
        std::shared_ptr<EngineRequest> request = std::move(slot.request);
        slot.phase = Phase::idle;
        slot.row = -1;
        slot.prompt_logprobs.clear();
        if (failed) {
            llama_memory_seq_rm(memory(), slot.seq, -1, -1);
            slot.cached.clear();
            slot.cached_loras.clear();
        }
        {
            std::lock_guard<std::mutex> lock(queue_->mutex);
            --queue_->n_busy;
        }
        queue_->room.notify_all();
        count_cached();
        request->finish(reason, std::move(error));
    }

    void add_token(llama_token token, llama_pos pos, llama_seq_id seq, bool logits) {
        llama_batch &b = batch_->batch;
        const int32_t i = b.n_tokens++;
        b.token[i] = token;
        b.pos[i] = pos;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = seq;
        b.logits[i] = logits ? 1 : 0;
    }

    // One scheduler step: drop cancelled requests, start waiting ones whose prefix is ready,
    // decode one batch (every running sequence's next token, then prompt chunks in admission
    // order), sample every sequence that got logits. A batch runs with one set of LoRA
    // adapters, the earliest admitted request's; sequences with other adapters wait for a
    // later step (llama-server's rule).
    void step() {
        for (auto &slot : slots_) {
            if (slot.request && slot.request->cancellation.cancelled()) {
                release(slot, "", std::make_exception_ptr(CancelledError("the generation was cancelled")));
            }
        }
        for (auto &slot : slots_) {
            if (slot.phase != Phase::wait_prefix) continue;
            const Slot &source = slots_[slot.source];
            if (source.phase != Phase::prefill || source.admitted != slot.source_admitted ||
                source.cached.size() >= slot.goal) {
                attach_prefix(slot);
            }
        }
        const Slot *first = nullptr;
        for (const auto &slot : slots_) {
            if ((slot.phase == Phase::decode || slot.phase == Phase::prefill) &&
                (first == nullptr || slot.admitted < first->admitted)) {
                first = &slot;
            }
        }
        if (first == nullptr) return;
        const LoraSet loras = first->request->loras;
        apply_loras(loras);

        // What each sequence puts in the batch: a decoding one its next token, prefilling ones
        // prompt chunks in admission order, as far as the batch has room.
        size_t room = static_cast<size_t>(batch_->capacity);
        std::vector<Slot *> prefilling;
        for (auto &slot : slots_) {
            slot.row = -1;
            slot.first_row = -1;
            slot.n_in_batch = 0;
            if (!slot.request || slot.request->loras != loras) continue;
            if (slot.phase == Phase::decode) {
                slot.n_in_batch = 1;
                --room;
            } else if (slot.phase == Phase::prefill) {
                prefilling.push_back(&slot);
            }
        }
        std::sort(prefilling.begin(), prefilling.end(), [](const Slot *a, const Slot *c) { return a->admitted < c->admitted; });
        for (Slot *slot : prefilling) {
            slot->n_in_batch = std::min(slot->request->prompt.size() - slot->cached.size(), room);
            room -= slot->n_in_batch;
        }
        // The tokens grouped by sequence, in sequence order: with a stream of cells per
        // sequence, llama.cpp cuts a batch into ubatches of consecutive sequence ids that each
        // take as many tokens (split_equal, sequential), so a prompt chunk placed after the
        // decoded tokens of higher sequences would cost a pass of its own.
        llama_batch &b = batch_->batch;
        b.n_tokens = 0;
        for (auto &slot : slots_) {
            if (slot.n_in_batch == 0) continue;
            if (slot.phase == Phase::decode) {
                slot.row = b.n_tokens;
                add_token(slot.next, static_cast<llama_pos>(slot.cached.size()), slot.seq, true);
                continue;
            }
            const auto &prompt = slot.request->prompt;
            const bool scoring = slot.request->scores_prompt();
            const size_t done = slot.cached.size();
            slot.first_row = b.n_tokens;
            for (size_t i = 0; i < slot.n_in_batch; ++i) {
                const bool last = done + i + 1 == prompt.size();
                if (last) slot.row = b.n_tokens;
                add_token(prompt[done + i], static_cast<llama_pos>(done + i), slot.seq, last || scoring);
            }
        }

        int32_t rc = 0;
        {
            std::lock_guard<std::mutex> lock(ctx_mutex_);  // a decode may grow the compute buffers
            rc = llama_decode(ctx_.get(), b);
        }
        ++n_decode_calls_;
        if (rc == 2 && aborting_.load()) return;  // closing: run() fails what is left
        if (rc != 0) {
            std::exception_ptr error = rc == 1 ? std::make_exception_ptr(ContextOverflowError("no room left in the KV cache"))
                                               : std::make_exception_ptr(DecodeError("llama_decode failed with code " + std::to_string(rc)));
            for (auto &slot : slots_) {
                if (slot.n_in_batch > 0) release(slot, "", error);
            }
            return;
        }
        for (auto &slot : slots_) {
            if (slot.n_in_batch == 0) continue;
            try {
                if (slot.phase == Phase::decode) {
                    slot.cached.push_back(slot.next);
                } else {
                    prefilled(slot);
                }
                if (slot.row >= 0) sample(slot);
            } catch (...) {
                // One request's failure (a Python hook raising, llama.cpp's grammar sampler
                // throwing) ends it alone; the others keep running.
                if (slot.request) release(slot, "", std::current_exception());
            }
        }
    }

    // The prompt tokens of this step are in the cache: score them if asked for, and once the
    // whole prompt is in, hand its logprobs to the reader and start generating.
    void prefilled(Slot &slot) {
        EngineRequest &request = *slot.request;
        const auto &prompt = request.prompt;
        const size_t done = slot.cached.size();
        const auto first = prompt.begin() + static_cast<ptrdiff_t>(done);
        slot.cached.insert(slot.cached.end(), first, first + static_cast<ptrdiff_t>(slot.n_in_batch));
        n_prompt_evaluated_ += static_cast<int64_t>(slot.n_in_batch);
        if (request.scores_prompt()) {
            const int32_t n_vocab = llama_vocab_n_tokens(vocab_);
            for (size_t i = 0; i < slot.n_in_batch && done + i + 1 < prompt.size(); ++i) {
                const float *logits = llama_get_logits_ith(ctx_.get(), slot.first_row + static_cast<int32_t>(i));
                slot.prompt_logprobs.push_back(logprob_of(logits, n_vocab, prompt[done + i + 1], request.n_probs()));
            }
        }
        if (slot.cached.size() < prompt.size()) return;
        slot.phase = Phase::decode;
        if (request.scores_prompt()) {
            std::lock_guard<std::mutex> lock(request.mutex);
            request.prompt_logprobs = std::move(slot.prompt_logprobs);
        }
        slot.prompt_logprobs.clear();
    }

    // Samples `slot`'s next token from its logits row and hands out the text it completes,
    // by the request's SequenceDecoder (the same rules as Context.generate).
    void sample(Slot &slot) {
        EngineRequest &request = *slot.request;
        const Sample sample = request.decoder.sample(ctx_.get(), slot.row);
        ++n_generated_;
        Chunk chunk;
        const bool more = request.decoder.accept(sample, slot.cached.size(), chunk);
        request.publish(chunk);
        if (more) {
            slot.next = sample.token;
        } else {
            const std::string reason = request.decoder.finish_reason();
            release(slot, reason);
        }
    }

    void apply_loras(const LoraSet &loras) {
        if (loras == applied_) return;
        set_context_loras(ctx_.get(), loras);
        applied_ = loras;
    }

    ModelHandle model_;
    const llama_vocab *vocab_;
    EngineOptions options_;
    std::shared_ptr<EngineQueue> queue_;
    std::shared_ptr<ExpertProfiler> profiler_;  // the context's eval callback writes to it: freed after it
    std::unique_ptr<llama_context, ContextDeleter> ctx_;
    std::unique_ptr<BatchOwner> batch_;
    LoraSet applied_;  // the adapters the context applies now (scheduler thread; it refers to them)
    std::vector<Slot> slots_;
    int32_t n_ctx_seq_ = 0;
    bool unified_ = false;  // one cell pool for all sequences (ContextOptions::kv_unified)
    uint64_t clock_ = 0;
    std::atomic<bool> aborting_{false};  // read by llama.cpp's abort callback
    std::atomic<bool> closed_{false};
    std::atomic<int64_t> n_decode_calls_{0}, n_prompt_evaluated_{0}, n_prompt_reused_{0}, n_generated_{0};
    std::atomic<int64_t> n_cached_tokens_{0};  // sum of the slots' cached tokens after the last step
    // Queue waits of admitted requests, per bucket of kQueueTimeBounds (+inf last); guarded by
    // the queue's mutex (admit() holds it).
    std::array<int64_t, kQueueTimeBounds.size() + 1> queue_time_counts_{};
    double queue_time_sum_ = 0.0;
    std::mutex close_mutex_;  // one closer joins the scheduler
    // Guards ctx_'s buffers against memory_use(): held around llama_decode and the free.
    mutable std::mutex ctx_mutex_;
    std::thread scheduler_;   // last: started once everything above exists
};

void bind_engine(nb::module_ &m) {
    py_pool_busy_error = new_exception(m, "PoolBusyError", py_llama_error,
                                       "Every slot of the pool is busy and its queue is full.");
    // Registered after bind_errors' translator, so tried before it (nanobind tries the newest
    // first): PoolBusyError is a LlamaError.
    nb::register_exception_translator([](const std::exception_ptr &p, void *) {
        try {
            std::rethrow_exception(p);
        } catch (const PoolBusyError &e) {
            PyErr_SetString(py_pool_busy_error, e.what());
        }
    });

    nb::class_<EngineOptions>(m, "EngineOptions", "Slots and queue of an Engine.")
        .def(nb::init<>())
        .def_rw("n_slots", &EngineOptions::n_slots, "Concurrent sequences (the pool size).")
        .def_rw("max_queue", &EngineOptions::max_queue, "Requests that may wait for a slot.")
        .def_rw("min_shared_prefix", &EngineOptions::min_shared_prefix,
                "Prompt tokens shared with a running prefill worth waiting for and copying.");

    nb::class_<EngineStats>(m, "EngineStats", "Counters of an Engine since it started.")
        .def_ro("n_slots", &EngineStats::n_slots)
        .def_ro("n_busy", &EngineStats::n_busy, "Requests holding a slot.")
        .def_ro("n_waiting", &EngineStats::n_waiting, "Requests queued for a slot.")
        .def_ro("n_decode_calls", &EngineStats::n_decode_calls)
        .def_ro("n_prompt_evaluated", &EngineStats::n_prompt_evaluated, "Prompt tokens decoded.")
        .def_ro("n_prompt_reused", &EngineStats::n_prompt_reused, "Prompt tokens served from cached prefixes.")
        .def_ro("n_generated", &EngineStats::n_generated, "Tokens sampled.")
        .def_ro("queue_time_buckets", &EngineStats::queue_time_buckets,
                "Waits for a slot: (upper bound in seconds, requests admitted within it), cumulative, +inf last.")
        .def_ro("queue_time_sum", &EngineStats::queue_time_sum, "Seconds admitted requests waited, in all.")
        .def_ro("n_cached_tokens", &EngineStats::n_cached_tokens,
                "Tokens the sequences hold in the KV cache now (a prefix shared by several counts in each).");

    nb::class_<EngineStream>(m, "EngineStream", "One request of an Engine, read chunk by chunk.")
        .def("next", &EngineStream::next, nb::call_guard<nb::gil_scoped_release>(),
             "The next token's text and token (blocks for it; a character split across tokens comes whole); None at the end.")
        .def("cancel", &EngineStream::cancel, nb::call_guard<nb::gil_scoped_release>(),
             "End the request and free its slot; next() then raises GenerationCancelled.")
        .def("close", &EngineStream::close, nb::call_guard<nb::gil_scoped_release>(),
             "Cancel the request unless it has finished (leaving a stream early).")
        .def_prop_ro("finished", &EngineStream::finished)
        .def_prop_ro("finish_reason", &EngineStream::finish_reason)
        .def_prop_ro("stop_sequence", &EngineStream::stop_sequence, "The stop string that ended it, if one did.")
        .def_prop_ro("queue_seconds", &EngineStream::queue_seconds,
                     "Seconds the request waited for a slot (None while it waits).")
        .def_prop_ro("n_prompt", &EngineStream::n_prompt)
        .def_prop_ro("n_reused", &EngineStream::n_reused, "Prompt tokens served from a cached prefix.")
        .def_prop_ro("tokens", &EngineStream::tokens, "The tokens read so far.")
        .def_prop_ro("prompt_logprobs", &EngineStream::prompt_logprobs,
                     "Logprobs of the prompt's tokens after the first (once it is evaluated), if asked for.")
        .def_prop_ro("cancellation", &EngineStream::cancellation);

    nb::class_<Engine>(m, "Engine", "Continuous batching: n_slots sequences of one context, one scheduler thread.")
        .def(nb::init<const Model &, const ContextOptions &, const EngineOptions &>(), "model"_a, "context"_a,
             "options"_a, nb::call_guard<nb::gil_scoped_release>())
        .def("submit", &Engine::submit, "prompt"_a, "sampling"_a, "options"_a, "wait"_a = false,
             "loras"_a = std::vector<std::pair<LoraAdapter, float>>(),
             nb::call_guard<nb::gil_scoped_release>(),
             "Queue a generation (run with the LoRA adapters ``loras`` at their scales). Raises PoolBusyError "
             "when the queue is full (with wait=False).")
        .def("close", &Engine::close, nb::call_guard<nb::gil_scoped_release>(),
             "Stop the scheduler, fail unfinished requests with ClosedError, free the context. Idempotent.")
        .def_prop_ro("closed", &Engine::closed)
        .def_prop_ro("n_ctx_seq", &Engine::n_ctx_seq, "Tokens each sequence may hold.")
        .def("stats", &Engine::stats, nb::call_guard<nb::gil_scoped_release>())
        .def("memory_breakdown", &Engine::memory_use, nb::call_guard<nb::gil_scoped_release>(),
             "llama.cpp's accounting by device: {name: {'model', 'context', 'compute': bytes}}.")
        .def("expert_profiler", &Engine::expert_profiler,
             "The expert-routing profiler (None unless created with profile_experts on a MoE model).");
}

// =====================================================================================
// Fitting: llama.cpp's common_fit_params chooses GPU layers, expert overrides and the
// context size for each device's free memory, by loading the model without allocating.
// =====================================================================================

struct FitDevice {
    std::string name;
    int64_t free = 0;
    int64_t total = 0;
    size_t model = 0;
    size_t context = 0;
    size_t compute = 0;
};

struct FitResult {
    int status = COMMON_PARAMS_FIT_STATUS_SUCCESS;  // common_params_fit_status
    int32_t n_gpu_layers = 0;
    uint32_t n_ctx = 0;
    std::vector<float> tensor_split;  // empty: llama.cpp decides
    std::vector<std::pair<std::string, std::string>> tensor_overrides;  // (regex, device name)
    std::vector<FitDevice> devices;  // projected use with the chosen parameters; "CPU" last
    uint32_t n_layer = 0;
    uint32_t n_ctx_train = 0;
    uint32_t n_expert = 0;
};

// common_fit_params swaps llama.cpp's process-wide log callback while it runs (and restores
// it after): two at once would restore each other's. One fit at a time in this process.
std::mutex fit_mutex;

std::string buffer_type_device(ggml_backend_buffer_type_t buft) {
    if (buft == nullptr || ggml_backend_buft_is_host(buft)) return "CPU";
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    return dev != nullptr ? ggml_backend_dev_name(dev) : ggml_backend_buft_name(buft);
}

FitResult fit_params(const std::string &path, const ModelOptions &options, const ContextOptions &context,
                     size_t margin, uint32_t n_ctx_min) {
    QuietScope quiet(!options.verbose);
    ModelParams built(path, options);
    llama_model_params mparams = built.params;
    llama_context_params cparams = context_params(context);
    // Writable buffers of the sizes common_fit_params asks for, holding what the caller set.
    std::vector<float> split(llama_max_devices(), 0.0f);
    if (mparams.tensor_split != nullptr) {
        std::copy(mparams.tensor_split, mparams.tensor_split + llama_max_devices(), split.begin());
        mparams.tensor_split = split.data();
    }
    std::vector<llama_model_tensor_buft_override> overrides(llama_max_tensor_buft_overrides(), {nullptr, nullptr});
    const auto given = built.tensor_overrides();
    std::copy(given.begin(), given.end(), overrides.begin());
    if (!given.empty()) mparams.tensor_buft_overrides = overrides.data();
    std::vector<size_t> margins(llama_max_devices(), margin);

    FitResult result;
    std::vector<ggml_backend_dev_t> devs;
    common_device_memory_data_vec projected;
    {
        std::lock_guard<std::mutex> lock(fit_mutex);
        tl_last_errors.clear();
        result.status = common_fit_params(path.c_str(), &mparams, &cparams, split.data(), overrides.data(),
                                          margins.data(), n_ctx_min, nullptr, GGML_LOG_LEVEL_ERROR);
        if (result.status == COMMON_PARAMS_FIT_STATUS_ERROR) {
            throw ModelLoadError("cannot fit '" + path + "' to device memory: " +
                                 last_errors_or("llama.cpp could not load it (see the llama_cpp log)"));
        }
        try {
            projected = common_get_device_memory_data(path.c_str(), &mparams, &cparams, devs, result.n_layer,
                                                      result.n_ctx_train, result.n_expert, GGML_LOG_LEVEL_ERROR);
        } catch (const std::runtime_error &e) {
            throw ModelLoadError("cannot project the memory of '" + path + "': " + e.what() + ": " +
                                 last_errors_or("see the llama_cpp log"));
        }
    }
    result.n_gpu_layers = mparams.n_gpu_layers;
    result.n_ctx = cparams.n_ctx;
    if (mparams.tensor_split != nullptr && std::any_of(split.begin(), split.end(), [](float f) { return f != 0.0f; })) {
        size_t n = split.size();
        while (n > 0 && split[n - 1] == 0.0f) --n;
        result.tensor_split.assign(split.begin(), split.begin() + static_cast<std::ptrdiff_t>(n));
    }
    if (mparams.tensor_buft_overrides != nullptr) {
        for (const auto *o = mparams.tensor_buft_overrides; o->pattern != nullptr; ++o) {
            result.tensor_overrides.emplace_back(o->pattern, buffer_type_device(o->buft));
        }
    }
    for (size_t i = 0; i < projected.size(); ++i) {
        const auto &d = projected[i];
        result.devices.push_back({i < devs.size() ? ggml_backend_dev_name(devs[i]) : "CPU", d.free, d.total,
                                  d.model, d.context, d.compute});
    }
    return result;
}

void bind_fit(nb::module_ &m) {
    nb::class_<FitDevice>(m, "FitDevice", "One device's memory, as common_fit_params projects it.")
        .def_ro("name", &FitDevice::name)
        .def_ro("free", &FitDevice::free)
        .def_ro("total", &FitDevice::total)
        .def_ro("model", &FitDevice::model)
        .def_ro("context", &FitDevice::context)
        .def_ro("compute", &FitDevice::compute);
    nb::class_<FitResult>(m, "FitResult", "What common_fit_params chose.")
        .def_ro("status", &FitResult::status, "0 success, 1 failure (no placement projected to fit).")
        .def_ro("n_gpu_layers", &FitResult::n_gpu_layers)
        .def_ro("n_ctx", &FitResult::n_ctx)
        .def_ro("tensor_split", &FitResult::tensor_split)
        .def_ro("tensor_overrides", &FitResult::tensor_overrides)
        .def_ro("devices", &FitResult::devices)
        .def_ro("n_layer", &FitResult::n_layer)
        .def_ro("n_ctx_train", &FitResult::n_ctx_train)
        .def_ro("n_expert", &FitResult::n_expert);
    m.def("fit_params", &fit_params, "path"_a, "model"_a, "context"_a, "margin"_a, "n_ctx_min"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          "Run llama.cpp's common_fit_params (one at a time in the process), then project the memory of "
          "what it chose. Raises ModelLoadError if the file does not load, InvalidArgumentError for bad "
          "options.");
}

}  // namespace

NB_MODULE(_core, m) {
    m.doc() = "The native core of llama_cpp: llama.cpp through nanobind.";
    bind_errors(m);
    bind_logging(m);
    bind_backend(m);
    bind_model(m);
    bind_sampling(m);
    bind_chat(m);
    bind_text(m);
    bind_decoding(m);
    bind_experts(m);
    bind_context(m);
    bind_generation(m);
    bind_engine(m);
    bind_fit(m);
}
