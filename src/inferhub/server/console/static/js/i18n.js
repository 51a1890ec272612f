// Simplified Chinese and English: the strings, the chosen language (remembered in
// localStorage), and t(key, vars) to look a string up.
export const LANGS = [["en", "English"], ["zh-CN", "简体中文"]];
const STORE = "inferhub.console.lang";

const en = {
  skip: "Skip to content", console: "console", language: "Language", logout: "Log out",
  loading: "Loading…", close: "Close", cancel: "Cancel", save: "Save", edit: "Edit", delete: "Delete",
  actions: "Actions", none: "Nothing here yet.", copy: "Copy", copied: "Copied to the clipboard.",
  "nav.main": "Main", "nav.keys": "API keys", "nav.usage": "Usage & billing", "nav.playground": "Playground",
  "nav.account": "My account", "nav.operator": "Operator", "nav.accounts": "Accounts", "nav.prices": "Prices",
  "nav.all_usage": "All usage",

  "login.title": "Log in to inferhub", "login.lead": "Manage your API keys, watch your usage and try models.",
  "login.email": "Email or account name", "login.password": "Password", "login.submit": "Log in",
  "login.missing": "Enter your email (or account name) and password.",
  "login.expired": "Your session has ended. Log in again.", "login.logged_out": "You have logged out.",

  "keys.lead": "Keys authenticate your calls to the API. Keep them secret: anyone with a key can spend your credit.",
  "keys.list_title": "Your keys", "keys.show_all": "Show revoked and expired keys",
  "keys.name": "Name", "keys.key": "Key", "keys.models": "Models", "keys.all_models": "All models",
  "keys.limits": "Limits", "keys.unlimited": "None", "keys.concurrent": "concurrent", "keys.spent": "Spent / cap",
  "keys.created": "Created", "keys.last_used": "Last used", "keys.never": "Never", "keys.expires": "Expires",
  "keys.status": "Status", "keys.active": "Active", "keys.revoked": "Revoked", "keys.expired": "Expired",
  "keys.revoke": "Revoke", "keys.revoke_title": "Revoke this key?",
  "keys.revoke_confirm": "Revoke “{name}” ({prefix})? Every application that uses it is refused from its next request. This cannot be undone.",
  "keys.revoked_done": "Key “{name}” is revoked.", "keys.none": "No keys yet. Create one below.",
  "keys.create_title": "Create a key", "keys.create": "Create key",
  "keys.name_hint": "To recognise the key later, e.g. “production” or “laptop”.",
  "keys.models_hint": "Tick none to allow every model.", "keys.rpm": "Requests per minute",
  "keys.tpm": "Tokens per minute", "keys.concurrency": "Concurrent requests",
  "keys.spend_cap": "Spend cap ({currency})", "keys.blank_unlimited": "Leave empty for no limit.",
  "keys.days": "In {n} days", "keys.new_key": "Your new API key",
  "keys.created_title": "Your new API key",
  "keys.shown_once": "This is the only time the key is shown. Copy it now and store it somewhere safe; if you lose it, revoke it and create a new one.",
  "keys.saved_it": "I have saved the key", "keys.code_title": "Call the API",
  "keys.code_lead": "Ready-to-paste examples. Set the environment variable INFERHUB_API_KEY to your key first.",
  "keys.model_for_code": "Model in the examples",

  "usage.summary": "Summary", "usage.balance": "Balance", "usage.available_note": "available {available} · held by running requests {reserved}",
  "usage.spent_range": "Spent, last {n} days", "usage.tokens_in": "Input tokens", "usage.tokens_out": "Output tokens",
  "usage.requests": "Requests", "usage.cost": "Cost", "usage.per_day": "Per day", "usage.tokens_per_day": "Tokens per day",
  "usage.cost_per_day": "Cost per day", "usage.chart_data": "The numbers behind the charts", "usage.day": "Day",
  "usage.per_model": "Per model", "usage.per_key": "Per key", "usage.model": "Model", "usage.key": "Key",
  "usage.account": "Account", "usage.no_usage": "No usage in this period.", "usage.recent": "Recent requests",
  "usage.time": "Time", "usage.prompt_tokens": "Prompt tokens", "usage.completion_tokens": "Completion tokens",
  "usage.end_state": "End", "usage.in_progress": "In progress", "usage.no_requests": "No requests yet.",
  "usage.prev": "Previous", "usage.next": "Next", "usage.page": "Page {n}", "usage.export": "Export CSV",
  "usage.exported": "Exported {n} rows.", "usage.range": "Period", "usage.last_days": "Last {n} days",
  "usage.end.completed": "Completed", "usage.end.client_disconnected": "Client left", "usage.end.error": "Error",
  "usage.end.shutdown": "Server stopped", "usage.end.rejected": "Refused", "usage.end.crashed": "Recovered",

  "pg.lead": "Try a model. Replies are billed to your account like any API call, through a temporary key of this session that expires within an hour.",
  "pg.settings": "Model and parameters", "pg.model": "Model", "pg.system": "System message",
  "pg.optional": "Optional", "pg.stop_hint": "Up to 4 stop sequences, separated by commas; \\n is a newline.",
  "pg.conversation": "Conversation", "pg.empty": "Send a message to start.", "pg.message": "Message",
  "pg.placeholder": "Type a message…", "pg.send": "Send", "pg.stop": "Stop", "pg.clear": "Clear",
  "pg.enter_hint": "Enter sends, Shift+Enter adds a line.", "pg.you": "You", "pg.assistant": "Assistant",
  "pg.generating": "Generating…", "pg.done": "Reply complete.", "pg.stopped": "Stopped.", "pg.failed": "The request failed.",
  "pg.usage": "{prompt} input + {completion} output tokens · cost {cost} · {finish}",
  "pg.price": "Price per million tokens: input {input}, output {output}.", "pg.no_model": "This server serves no model.",

  "me.profile": "Profile", "me.password": "Change password", "me.current": "Current password",
  "me.new": "New password", "me.again": "New password again", "me.change": "Change password",
  "me.changed": "Your password is changed; your other sessions were logged out.",
  "me.mismatch": "The two new passwords differ.", "me.too_short": "A password needs at least 8 characters.",
  "me.session_ends": "This session ends",

  "acc.list": "Accounts", "acc.name": "Name", "acc.email": "Email", "acc.role": "Role", "acc.admin": "Operator",
  "acc.user": "User", "acc.balance": "Balance", "acc.available": "Available", "acc.created": "Created",
  "acc.status": "Status", "acc.enabled": "Enabled", "acc.disabled": "Disabled", "acc.enable": "Enable",
  "acc.disable": "Disable", "acc.disable_title": "Disable this account?",
  "acc.disable_confirm": "Disable “{name}”? Its keys and console sessions stop working until it is enabled again.",
  "acc.topup": "Top up", "acc.topup_title": "Top up “{name}”", "acc.current_balance": "Current balance: {balance}",
  "acc.amount": "Amount ({currency})", "acc.amount_hint": "A negative amount corrects the balance down.",
  "acc.note": "Note (e.g. invoice number)", "acc.topped_up": "“{name}” now has a balance of {balance}.",
  "acc.set_password": "Set password", "acc.password_title": "Console password of “{name}”",
  "acc.password": "Password", "acc.password_hint": "At least 8 characters.",
  "acc.password_set": "The password of “{name}” is set; its sessions were logged out.",
  "acc.create_title": "Create an account", "acc.create": "Create account",
  "acc.email_hint": "Used to log in to the console.", "acc.initial_credit": "Initial credit ({currency})",
  "acc.created_done": "Account “{name}” created.",

  "price.lead": "Prices per million tokens. A model without its own price uses the default (*). A change applies to requests that start after it.",
  "price.list": "Prices", "price.model": "Model", "price.default": "(default)", "price.input": "Input per 1M tokens ({currency})",
  "price.output": "Output per 1M tokens ({currency})", "price.updated": "Updated", "price.set": "Save price",
  "price.set_title": "Set a price", "price.model_hint": "A served model name, or * for the default.",
  "price.saved": "Price of {model} saved.", "price.delete_title": "Delete this price?",
  "price.delete_confirm": "Delete the price of {model}? It then costs the default price.",

  "au.all_accounts": "All accounts", "au.per_account": "Per account",

  "err.http": "The request failed (HTTP {status}).", "err.server": "The server had a problem: {message}",
  "err.network": "The server cannot be reached. Check your connection and try again.",
  "err.amount": "Enter an amount such as 10 or 0.25 (at most 6 decimals).",
  "err.positive_int": "{field} must be a whole number of at least 1.", "err.required": "{field} is required.",
  "err.copy": "Copying failed; select the text and copy it yourself.",
  "err.code.invalid_credentials": "Incorrect email or password.",
  "err.code.invalid_session": "Your session has ended. Log in again.",
  "err.code.csrf_failed": "The page is out of date. Reload it and try again.",
  "err.code.admin_required": "Only operators may do this.",
  "err.code.insufficient_quota": "Your balance is too low for this request. Ask an operator to top up your account.",
  "err.code.not_available": "This server runs without accounts, so the console is not available.",
};

const zh = {
  skip: "跳到主要内容", console: "控制台", language: "语言", logout: "退出登录",
  loading: "加载中…", close: "关闭", cancel: "取消", save: "保存", edit: "编辑", delete: "删除",
  actions: "操作", none: "暂无内容。", copy: "复制", copied: "已复制到剪贴板。",
  "nav.main": "主导航", "nav.keys": "API 密钥", "nav.usage": "用量与账单", "nav.playground": "体验中心",
  "nav.account": "我的账户", "nav.operator": "运营管理", "nav.accounts": "账户", "nav.prices": "价格",
  "nav.all_usage": "全部用量",

  "login.title": "登录 inferhub", "login.lead": "管理 API 密钥，查看用量，在线体验模型。",
  "login.email": "邮箱或账户名", "login.password": "密码", "login.submit": "登录",
  "login.missing": "请输入邮箱（或账户名）和密码。",
  "login.expired": "会话已结束，请重新登录。", "login.logged_out": "您已退出登录。",

  "keys.lead": "密钥用于调用 API 时的身份验证。请妥善保管：任何持有密钥的人都可以消耗您的余额。",
  "keys.list_title": "我的密钥", "keys.show_all": "显示已撤销和已过期的密钥",
  "keys.name": "名称", "keys.key": "密钥", "keys.models": "模型", "keys.all_models": "全部模型",
  "keys.limits": "限制", "keys.unlimited": "无", "keys.concurrent": "并发", "keys.spent": "已用 / 上限",
  "keys.created": "创建时间", "keys.last_used": "最近使用", "keys.never": "从不", "keys.expires": "过期时间",
  "keys.status": "状态", "keys.active": "有效", "keys.revoked": "已撤销", "keys.expired": "已过期",
  "keys.revoke": "撤销", "keys.revoke_title": "撤销此密钥？",
  "keys.revoke_confirm": "确定撤销“{name}”（{prefix}）吗？使用它的应用从下一个请求起都会被拒绝。此操作无法撤回。",
  "keys.revoked_done": "密钥“{name}”已撤销。", "keys.none": "还没有密钥，请在下方创建。",
  "keys.create_title": "创建密钥", "keys.create": "创建密钥",
  "keys.name_hint": "便于日后识别，例如“生产环境”或“笔记本”。",
  "keys.models_hint": "不勾选表示允许全部模型。", "keys.rpm": "每分钟请求数",
  "keys.tpm": "每分钟 token 数", "keys.concurrency": "并发请求数",
  "keys.spend_cap": "消费上限（{currency}）", "keys.blank_unlimited": "留空表示不限制。",
  "keys.days": "{n} 天后", "keys.new_key": "新的 API 密钥",
  "keys.created_title": "新的 API 密钥",
  "keys.shown_once": "密钥只显示这一次。请立即复制并妥善保存；如果丢失，请撤销后重新创建。",
  "keys.saved_it": "我已保存密钥", "keys.code_title": "调用 API",
  "keys.code_lead": "可直接粘贴的示例。请先把环境变量 INFERHUB_API_KEY 设为您的密钥。",
  "keys.model_for_code": "示例中的模型",

  "usage.summary": "概览", "usage.balance": "余额", "usage.available_note": "可用 {available} · 进行中请求预留 {reserved}",
  "usage.spent_range": "近 {n} 天消费", "usage.tokens_in": "输入 token", "usage.tokens_out": "输出 token",
  "usage.requests": "请求数", "usage.cost": "费用", "usage.per_day": "按天", "usage.tokens_per_day": "每日 token 数",
  "usage.cost_per_day": "每日费用", "usage.chart_data": "图表数据", "usage.day": "日期",
  "usage.per_model": "按模型", "usage.per_key": "按密钥", "usage.model": "模型", "usage.key": "密钥",
  "usage.account": "账户", "usage.no_usage": "此期间没有用量。", "usage.recent": "最近请求",
  "usage.time": "时间", "usage.prompt_tokens": "输入 token", "usage.completion_tokens": "输出 token",
  "usage.end_state": "结束状态", "usage.in_progress": "进行中", "usage.no_requests": "还没有请求。",
  "usage.prev": "上一页", "usage.next": "下一页", "usage.page": "第 {n} 页", "usage.export": "导出 CSV",
  "usage.exported": "已导出 {n} 行。", "usage.range": "时间范围", "usage.last_days": "近 {n} 天",
  "usage.end.completed": "完成", "usage.end.client_disconnected": "客户端断开", "usage.end.error": "出错",
  "usage.end.shutdown": "服务停止", "usage.end.rejected": "被拒绝", "usage.end.crashed": "已恢复",

  "pg.lead": "在线体验模型。回复与普通 API 调用一样计费，通过本次会话的临时密钥发送，该密钥一小时内过期。",
  "pg.settings": "模型与参数", "pg.model": "模型", "pg.system": "系统消息",
  "pg.optional": "可选", "pg.stop_hint": "最多 4 个停止序列，用逗号分隔；\\n 表示换行。",
  "pg.conversation": "对话", "pg.empty": "发送一条消息开始对话。", "pg.message": "消息",
  "pg.placeholder": "输入消息…", "pg.send": "发送", "pg.stop": "停止", "pg.clear": "清空",
  "pg.enter_hint": "Enter 发送，Shift+Enter 换行。", "pg.you": "您", "pg.assistant": "助手",
  "pg.generating": "生成中…", "pg.done": "回复完成。", "pg.stopped": "已停止。", "pg.failed": "请求失败。",
  "pg.usage": "输入 {prompt} + 输出 {completion} token · 费用 {cost} · {finish}",
  "pg.price": "每百万 token 价格：输入 {input}，输出 {output}。", "pg.no_model": "此服务没有可用模型。",

  "me.profile": "账户信息", "me.password": "修改密码", "me.current": "当前密码",
  "me.new": "新密码", "me.again": "再次输入新密码", "me.change": "修改密码",
  "me.changed": "密码已修改，其他会话均已退出登录。",
  "me.mismatch": "两次输入的新密码不一致。", "me.too_short": "密码至少需要 8 个字符。",
  "me.session_ends": "本次会话结束于",

  "acc.list": "账户", "acc.name": "名称", "acc.email": "邮箱", "acc.role": "角色", "acc.admin": "运营人员",
  "acc.user": "用户", "acc.balance": "余额", "acc.available": "可用", "acc.created": "创建时间",
  "acc.status": "状态", "acc.enabled": "已启用", "acc.disabled": "已停用", "acc.enable": "启用",
  "acc.disable": "停用", "acc.disable_title": "停用此账户？",
  "acc.disable_confirm": "确定停用“{name}”吗？在重新启用之前，它的密钥和控制台会话都将失效。",
  "acc.topup": "充值", "acc.topup_title": "为“{name}”充值", "acc.current_balance": "当前余额：{balance}",
  "acc.amount": "金额（{currency}）", "acc.amount_hint": "负数金额用于向下调整余额。",
  "acc.note": "备注（如发票号）", "acc.topped_up": "“{name}”的余额现为 {balance}。",
  "acc.set_password": "设置密码", "acc.password_title": "“{name}”的控制台密码",
  "acc.password": "密码", "acc.password_hint": "至少 8 个字符。",
  "acc.password_set": "已设置“{name}”的密码，其会话均已退出登录。",
  "acc.create_title": "创建账户", "acc.create": "创建账户",
  "acc.email_hint": "用于登录控制台。", "acc.initial_credit": "初始额度（{currency}）",
  "acc.created_done": "账户“{name}”已创建。",

  "price.lead": "每百万 token 的价格。没有单独定价的模型使用默认价格（*）。修改只对之后开始的请求生效。",
  "price.list": "价格", "price.model": "模型", "price.default": "（默认）", "price.input": "输入 每百万 token（{currency}）",
  "price.output": "输出 每百万 token（{currency}）", "price.updated": "更新时间", "price.set": "保存价格",
  "price.set_title": "设置价格", "price.model_hint": "已部署的模型名称，或 * 表示默认价格。",
  "price.saved": "已保存 {model} 的价格。", "price.delete_title": "删除此价格？",
  "price.delete_confirm": "确定删除 {model} 的价格吗？之后将按默认价格计费。",

  "au.all_accounts": "全部账户", "au.per_account": "按账户",

  "err.http": "请求失败（HTTP {status}）。", "err.server": "服务器出错：{message}",
  "err.network": "无法连接服务器，请检查网络后重试。",
  "err.amount": "请输入金额，例如 10 或 0.25（最多 6 位小数）。",
  "err.positive_int": "{field} 必须是不小于 1 的整数。", "err.required": "请填写{field}。",
  "err.copy": "复制失败，请手动选中文本复制。",
  "err.code.invalid_credentials": "邮箱或密码不正确。",
  "err.code.invalid_session": "会话已结束，请重新登录。",
  "err.code.csrf_failed": "页面已过期，请刷新后重试。",
  "err.code.admin_required": "只有运营人员可以执行此操作。",
  "err.code.insufficient_quota": "余额不足，无法完成此请求。请联系运营人员充值。",
  "err.code.not_available": "此服务未启用账户功能，控制台不可用。",
  "err.code.rate_limit_exceeded": "操作过于频繁，请稍后再试。",
  "err.code.invalid_api_key": "API 密钥无效、已撤销或已过期。",
  "err.code.model_not_found": "模型不存在或您无权使用。",
  "err.code.model_not_allowed": "此密钥不允许使用该模型。",
  "err.code.not_found": "找不到该对象，可能已被删除。",
  "err.code.conflict": "名称或邮箱已被使用。",
  "err.code.context_length_exceeded": "消息太长，超出了模型的上下文长度。请清空对话或减少 max_tokens。",
  "err.code.key_not_within_caller": "新密钥的权限不能超过创建它的密钥。",
};

export const DICTS = { en, "zh-CN": zh };

let current = null;

export function lang() {
  if (current) return current;
  let saved = null;
  try {
    saved = localStorage.getItem(STORE);
  } catch {
    saved = null;
  }
  if (!DICTS[saved]) saved = (navigator.language || "").toLowerCase().startsWith("zh") ? "zh-CN" : "en";
  current = saved;
  return current;
}

export function setLang(code) {
  current = DICTS[code] ? code : "en";
  try {
    localStorage.setItem(STORE, current);
  } catch {
    // private mode: the choice lasts for this page only
  }
}

/** The string `key` in the current language with {name} placeholders filled from `vars`;
 * a key the language lacks gives `fallback` (default: the English string, else the key). */
export function t(key, vars = {}, fallback = undefined) {
  let text = DICTS[lang()][key];
  if (text === undefined) {
    if (fallback !== undefined) return fallback;
    text = en[key] ?? key;
  }
  return text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
}

/** Translate the static page: data-i18n (text) and data-i18n-aria-label; set <html lang>. */
export function applyI18n(root) {
  document.documentElement.lang = lang();
  root.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  root.querySelectorAll("[data-i18n-aria-label]").forEach((el) => {
    el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
  });
}
